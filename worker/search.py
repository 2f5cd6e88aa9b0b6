"""`python -m worker search TEXT`: the tenant's nearest skills, as the app's search ranks them."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from db import catalog
from db.sql import tenant_scope
from tasks import runtime
from tasks.embedding import tenant_config


def search_command(settings: Any, args: argparse.Namespace) -> int:
    rt = runtime.install(settings)
    tenant = args.tenant or settings.default_tenant_id
    with tenant_scope(rt.engine, tenant) as conn:
        config = tenant_config(rt, conn, tenant)
    # As the app embeds a query: the tenant's model, through the deployment's slot, urgent.
    [query] = rt.providers.for_url(config.ollama_url).embed(
        [args.text], model=config.model, dimensions=config.dimensions, urgent=True
    )
    with tenant_scope(rt.engine, tenant) as conn:
        hits = catalog.nearest_skills(conn, tenant, query, limit=args.limit)
    if not hits:
        print(f"No embedded skill in tenant {tenant!r}.", file=sys.stderr)
        return 1
    print(f"Nearest skills of {tenant} to {args.text!r} ({config.model}):")
    width = max(len(hit.name) for hit in hits)
    for hit in hits:
        print(f"{hit.name:<{width}}  {hit.distance:.4f}  {hit.model_name}")
    return 0
