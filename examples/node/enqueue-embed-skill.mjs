// Queue `tasks.embed_skill` from Node, as the web app does: the same contract as the Python
// `tasks.enqueue_embed_skill(skill_id, tenant_id)`. Fire-and-forget, true when Redis holds the
// job, false (with one warning) when it could not be queued. It never throws and never waits
// longer than `timeoutMs`: the database stays the truth, and the worker's periodic reconcile
// catches any skill whose job was never queued.
//
//   REDIS_URL=redis://localhost:6379/0 node enqueue-embed-skill.mjs <skill_id> [tenant_id]

import { randomUUID } from "node:crypto";
import { realpathSync } from "node:fs";
import { hostname } from "node:os";
import { fileURLToPath } from "node:url";

import { createClient } from "celery-node";

/** @typedef {import("celery-node/dist/kombu/brokers/redis.js").default} RedisBroker */

export const EMBED_SKILL = "tasks.embed_skill"; // tasks/queues.py EMBED_SKILL
export const QUEUE = "embed"; // tasks/queues.py INTERACTIVE; "embed_bulk" is for backfills

/**
 * Queue an embedding refresh for a published or edited skill.
 *
 * @param {string} skillId
 * @param {string | null} [tenantId]
 * @param {{redisUrl?: string, timeoutMs?: number, logger?: {warn: (line: string) => void}}} [options]
 * @returns {Promise<boolean>} true once Redis has the job; false if it could not be queued
 */
export async function enqueueEmbedSkill(skillId, tenantId = null, options = {}) {
  const {
    redisUrl = process.env.REDIS_URL || "redis://localhost:6379/0",
    timeoutMs = 500,
    logger = console,
  } = options;
  /** @type {RedisBroker | undefined} */
  let broker; // closed in `finally`
  let timer;
  try {
    if (!/^rediss?:\/\//.test(redisUrl)) throw new Error("REDIS_URL is not a redis:// URL");
    // The third argument is the queue: celery-node uses it as the routing key, i.e. the Redis
    // list the message is pushed onto. The result backend is never used (fire-and-forget).
    const client = createClient(redisUrl, redisUrl, QUEUE);
    client.conf.TASK_PROTOCOL = 2; // Celery 5 message format (celery-node's default, made explicit)
    // ioredis options: one connection attempt, bounded, and no retries that outlive this call.
    client.conf.CELERY_BROKER_OPTIONS = {
      connectTimeout: timeoutMs,
      disconnectTimeout: 0, // see `finally`: close the socket at once
      maxRetriesPerRequest: 0,
      retryStrategy: () => null,
    };
    const redisBroker = /** @type {RedisBroker} */ (client.broker); // it is, for redis:// URLs
    broker = redisBroker;
    // Failures reach us through the promises below; without a listener ioredis prints a stack.
    redisBroker.redis.on("error", () => {});
    const taskId = randomUUID();
    const args = [skillId];
    const kwargs = { tenant_id: tenantId ?? null };
    // What `client.createTask(EMBED_SKILL).applyAsync(args, kwargs)` sends, but awaited: its
    // publish is not returned, so it could not tell us whether Redis ever got the job.
    const { headers, properties, body } = client.createTaskMessage(
      taskId,
      EMBED_SKILL,
      args,
      kwargs,
    );
    const publish = redisBroker.isReady().then(() =>
      redisBroker.publish(
        body,
        "",
        client.conf.CELERY_QUEUE,
        {
          ...headers,
          // Optional protocol v2 headers that Celery's own producers send: Flower and the
          // worker's events show the arguments and the sender.
          argsrepr: JSON.stringify(args),
          kwargsrepr: JSON.stringify(kwargs),
          origin: `${process.pid}@${hostname()}`,
        },
        properties,
      ),
    );
    const deadline = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`no answer within ${timeoutMs} ms`)), timeoutMs);
    });
    await Promise.race([publish, deadline]);
    return true;
  } catch (error) {
    logger.warn(`could not enqueue ${EMBED_SKILL} for ${skillId}: ${describe(error)}`);
    return false;
  } finally {
    clearTimeout(timer);
    // Close the socket now, not with QUIT: a Redis that accepted the connection but never
    // answers would hold a QUIT (and this process) open indefinitely.
    broker?.redis.disconnect();
  }
}

/** @param {unknown} error */
function describe(error) {
  if (error instanceof AggregateError && error.errors.length > 0) {
    return describe(error.errors[0]); // e.g. "localhost" resolving to both ::1 and 127.0.0.1
  }
  if (!(error instanceof Error)) return String(error);
  return error.message || /** @type {{code?: string}} */ (error).code || error.name;
}

/** @param {string[]} argv */
async function main(argv) {
  const [skillId, tenantId] = argv;
  if (!skillId || argv.length > 2) {
    console.error("usage: node enqueue-embed-skill.mjs <skill_id> [tenant_id]  (uses REDIS_URL)");
    return 2;
  }
  const queued = await enqueueEmbedSkill(skillId, tenantId ?? null, {
    logger: { warn: (line) => console.error(`error: ${line}`) },
  });
  if (!queued) return 1;
  console.log(`queued ${EMBED_SKILL} for ${skillId} on ${QUEUE}`);
  return 0;
}

function runAsScript() {
  try {
    return realpathSync(process.argv[1]) === fileURLToPath(import.meta.url);
  } catch {
    return false; // imported from a REPL, `node -e` or a bundler: no script path to compare
  }
}

if (runAsScript()) {
  process.exitCode = await main(process.argv.slice(2));
}
