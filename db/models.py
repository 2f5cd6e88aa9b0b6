"""Typed models of the tables the worker reads and writes.

The first four belong to the EverySkill app (drizzle); their names and types mirror the app's so the
worker drops into its database as is. The `embedding_run*` tables are the worker's own.
"""

from __future__ import annotations

from datetime import datetime

from pgvector.sqlalchemy import Vector
from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

PUBLISHED = "published"
SKILL_STATUSES = (
    "draft",
    "pending_review",
    "ai_reviewed",
    "approved",
    "rejected",
    "changes_requested",
    PUBLISHED,
)


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    is_active: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))


class Skill(Base):
    __tablename__ = "skills"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(Text, ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, server_default=text("'draft'"))
    visibility: Mapped[str] = mapped_column(Text, server_default=text("'tenant'"))
    updated_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())


class SkillEmbedding(Base):
    __tablename__ = "skill_embeddings"
    __table_args__ = (
        UniqueConstraint("tenant_id", "skill_id", name="skill_embeddings_tenant_skill_unique"),
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(Text, ForeignKey("tenants.id"))
    skill_id: Mapped[str] = mapped_column(Text, ForeignKey("skills.id", ondelete="CASCADE"))
    embedding: Mapped[list[float]] = mapped_column(Vector())
    model_name: Mapped[str] = mapped_column(Text)
    dimensions: Mapped[int] = mapped_column(Integer)
    input_hash: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())


class SiteSettings(Base):
    __tablename__ = "site_settings"

    id: Mapped[str] = mapped_column(Text, primary_key=True, server_default=text("'default'"))
    tenant_id: Mapped[str] = mapped_column(Text, unique=True)
    semantic_similarity_enabled: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    ollama_url: Mapped[str] = mapped_column(Text, server_default=text("'http://localhost:11434'"))
    ollama_model: Mapped[str] = mapped_column(Text, server_default=text("'nomic-embed-text'"))
    embedding_dimensions: Mapped[int] = mapped_column(Integer, server_default=text("768"))
    last_successful_connection: Mapped[datetime | None] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())


class EmbeddingRun(Base):
    """One backfill: its counts, kept in the database so they survive any process."""

    __tablename__ = "embedding_runs"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    tenant_id: Mapped[str | None] = mapped_column(Text)
    force: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    total: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    embedded: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    unchanged: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    failed: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    skipped: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    fanned_out: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    # Skills of the run that left the catalog before it ended; counted apart from its summary.
    unpublished: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    deleted: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class EmbeddingRunItem(Base):
    """One skill of a run; `outcome` is set once, so a redelivered job is never counted twice."""

    __tablename__ = "embedding_run_items"

    run_id: Mapped[str] = mapped_column(
        Text, ForeignKey("embedding_runs.id", ondelete="CASCADE"), primary_key=True
    )
    skill_id: Mapped[str] = mapped_column(Text, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(Text)
    position: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[str | None] = mapped_column(Text)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # False for a skill already current when the run started: listed, but no job is queued.
    needed_work: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
