// Submit a job to `vlmq api` with Node's global fetch (no packages) and print its result: what a service in another
// language does.
//
//   node api.mjs BASE_URL API_KEY JOB_JSON [WAIT_S]
//
// POSTs the job to /jobs, then long-polls its status URL (?wait=WAIT_S) until the job has ended, and prints one JSON
// line: {"submitted": <the 202 answer>, "status": <the last status answer>}. Exits 1 on any HTTP error.

const [base, key, jobJson, waitArg] = process.argv.slice(2);
if (!jobJson) {
  console.error("usage: node api.mjs BASE_URL API_KEY JOB_JSON [WAIT_S]");
  process.exit(64);
}
const headers = { Authorization: `Bearer ${key}`, "Content-Type": "application/json" };

async function call(method, path, body) {
  const response = await fetch(new URL(path, base), { method, headers, body });
  const answer = await response.json();
  if (!response.ok) {
    console.error(`${method} ${path}: HTTP ${response.status} ${JSON.stringify(answer)}`);
    process.exit(1);
  }
  return [response.status, answer];
}

const [code, submitted] = await call("POST", "/jobs", jobJson);
let status;
do {
  [, status] = await call("GET", `${submitted.status_url}?wait=${waitArg ?? 30}`);
} while (status.status === "queued" || status.status === "running");
console.log(JSON.stringify({ code, submitted, status }));
