// Send vlmq.run tasks with celery-node (a JavaScript Celery client) and print what it gets back.
//
//   node submit.mjs BROKER_URL BACKEND_URL QUEUE PROTOCOL CALLS_JSON [TIMEOUT_MS]
//
// CALLS_JSON is a list of {"id": ..., "args": [...], "kwargs": {...} | null}. "id" (optional) is the Celery task id
// (celery-node's sendTask takes it as its 4th argument; it makes a uuid4 when none is given). A call without a
// "kwargs" key is sent the way celery-node sends sendTask(name, args): kwargs undefined, which protocol 2 writes as
// null and protocol 1 leaves out of the body. Every call is sent, then all results are awaited together, each
// with celery-node's result.get(TIMEOUT_MS). One JSON line per call, in call order:
//   {"call": i, "task_id": ..., "state": "SUCCESS" | "FAILURE" | "TIMEOUT" | ..., "result": ..., "error": ...}
// "result" is what result.get resolved to; "error" is what it threw (celery-node copies the stored result's fields,
// e.g. exc_type and exc_message, onto the Error it throws). Exits 0 once the client is disconnected; exits 2 if
// anything escapes, 3 if it is still running well past the timeout.

import celery from "celery-node";

const [broker, backend, queue, protocol, callsJson, timeoutArg] = process.argv.slice(2);
if (!callsJson || !["1", "2"].includes(protocol)) {
  console.error("usage: node submit.mjs BROKER_URL BACKEND_URL QUEUE PROTOCOL(1|2) CALLS_JSON [TIMEOUT_MS]");
  process.exit(64);
}
const timeoutMs = Number(timeoutArg ?? 60000);

// celery-node publishes without awaiting the promise (sendTaskMessage is fire and forget): a failed publish is an
// unhandled rejection, and ioredis reconnects forever on a dead server. Neither may leave this process running.
process.on("unhandledRejection", (reason) => {
  console.error(`unhandled rejection: ${reason?.stack ?? reason}`);
  process.exit(2);
});
setTimeout(() => {
  console.error(`still running ${timeoutMs + 15000} ms after start; giving up`);
  process.exit(3);
}, timeoutMs + 15000).unref();

const client = celery.createClient(broker, backend, queue);
client.conf.TASK_PROTOCOL = Number(protocol);

const calls = JSON.parse(callsJson);
const sent = calls.map((call) => {
  const result =
    "kwargs" in call
      ? client.sendTask("vlmq.run", call.args, call.kwargs, call.id ?? undefined)
      : client.sendTask("vlmq.run", call.args, undefined, call.id ?? undefined);
  return result;
});

const outcomes = await Promise.all(
  sent.map((result) =>
    result.get(timeoutMs).then(
      (value) => ({ state: "SUCCESS", result: value, error: null }),
      (error) => ({ state: error.message, result: null, error: { ...error } }),
    ),
  ),
);
outcomes.forEach((outcome, i) => {
  console.log(JSON.stringify({ call: i, task_id: sent[i].taskId, ...outcome }));
});
await client.disconnect();
