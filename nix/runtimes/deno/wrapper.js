// The trusted wrapper for Deno bundles: Deno's main module, started by at-run-exec with the
// flags of one reuse key (one bundle, one set of grants and secrets). It reads the first job on
// stdin, opens the answer FIFO and gives up its own write permission to it, then loads the
// bundle with a runtime-built import() (checked against --allow-read, unlike a static import),
// calls the endpoint and writes one answer line, prefixed with the first job's token, on the
// FIFO; then it serves each further job line (same bundle, no token) the same way, until stdin
// ends. See at-run-exec for the whole picture.

// -- the answer channel ----------------------------------------------------------------------
// Bundle code runs in this realm and may rewrite any global or prototype before the wrapper
// writes its answer: a replaced TextEncoder.prototype.encode, Deno.FsFile.prototype.writeSync
// or Uint8Array.prototype.subarray, a getter on %TypedArray%.prototype or a setter on
// Object.prototype would see the answer line, and so the job's token (and writeSync even the
// open answer file), and could then write answer lines of its own. So everything the answer
// path uses is captured here, before the bundle is loaded, and the token and the answer bytes
// are only ever handed to these captured functions (never stored in a property, never passed
// to a method looked up later). The envelope (success, metrics) is assembled as text from
// trusted pieces: only the bundle's own value goes through JSON.stringify, so an
// Object.prototype.toJSON can change that value but not the envelope around it. The runner
// checks every answer anyway (atrund.execute.protocol.parse_answer): this keeps the answer the
// wrapper's, with real metrics.

const MAX_ERROR = 16384; // characters of an error message sent (results keep 4000 bytes)
const MAX_ERROR_TYPE = 128;
const apply = Reflect.apply;
const TypedArrayPrototype = Object.getPrototypeOf(Uint8Array.prototype);
const typedGetter = (name) => Object.getOwnPropertyDescriptor(TypedArrayPrototype, name).get;
const byteLengthOf = typedGetter("byteLength");
const byteOffsetOf = typedGetter("byteOffset");
const bufferOf = typedGetter("buffer");
const Bytes = Uint8Array;
const sliceString = String.prototype.slice;
const toText = String;
const round = Math.round;
const isFinite = Number.isFinite;
const realExit = Deno.exit;
const stringify = JSON.stringify;
const encoder = new TextEncoder();
const encode = encoder.encode.bind(encoder); // deno's encode: a brand check and a native op
const now = performance.now.bind(performance);

// Job lines, read synchronously: `new Response(Deno.stdin.readable)` would load the web streams
// code first, about 20 ms here, and between two jobs nothing of the bundle should run.
const readInput = Deno.stdin.readSync.bind(Deno.stdin);
const parse = JSON.parse;
const decoder = new TextDecoder();
const decode = decoder.decode.bind(decoder);
let input = new Uint8Array(0);

function nextJob() {
  for (;;) {
    const nl = input.indexOf(10);
    if (nl >= 0) {
      const line = input.slice(0, nl);
      input = input.slice(nl + 1);
      return parse(decode(line));
    }
    const buf = new Uint8Array(1 << 16);
    const n = readInput(buf);
    if (n === null) return null; // at-run-exec closed our stdin: the worker is done
    const joined = new Uint8Array(input.length + n);
    joined.set(input);
    joined.set(buf.subarray(0, n), input.length);
    input = joined;
  }
}

const job = nextJob();
const token = toText(job.token);
const answerFile = Deno.openSync(job.answerPath, { write: true });
const write = answerFile.writeSync.bind(answerFile);
Deno.permissions.revokeSync({ name: "write", path: job.answerPath });

const bundleUrl = (() => {
  const url = new URL("file:///");
  url.pathname = job.codePath;
  return url.href;
})();

let settle = null; // ends the current job with its answer line; null once it has one
let callStarted = null;
let loadTimeMs;

function ms(x) {
  const n = round(x);
  return n > 0 ? n : 0;
}

// JSON text of the metrics: numbers into a template, no object the bundle could reach.
function metrics(started) {
  let text = "";
  if (started != null) text = `"executionTimeMs":${ms(now() - started)}`;
  if (loadTimeMs != null) text = `${text}${text ? "," : ""}"loadTimeMs":${loadTimeMs}`;
  return `{${text}}`;
}

function cut(text, max) {
  if (typeof text !== "string") return "(not a string)";
  return text.length > max ? `${apply(sliceString, text, [0, max])} … (truncated)` : text;
}

// The answer line of a failure. JSON.stringify of a primitive string calls no code of the bundle.
function failure(error, errorType, started = callStarted) {
  return `{"success":false,"error":${stringify(cut(error, MAX_ERROR))},` +
    `"errorType":${stringify(cut(errorType, MAX_ERROR_TYPE))},"metrics":${metrics(started)}}`;
}

// The answer line of a success: the bundle's value (as `field`) inside a trusted envelope.
function success(field, value, started = callStarted) {
  const measured = metrics(started);
  let text;
  try {
    text = stringify(value, strictJson);
  } catch (e) {
    return failure(`return value is not JSON: ${message(e)}`, "TypeError", started);
  }
  // JSON.stringify gives one JSON value without a newline, or undefined (nothing to send).
  const body = typeof text === "string" ? `,"${field}":${text}` : "";
  return `{"success":true${body},"metrics":${measured}}`;
}

// The current job's answer (the first one given wins: a failure from an error event may race
// the call's own end).
function answer(line) {
  if (settle === null) return;
  const done = settle;
  settle = null;
  currentRun = null; // the job's ctx.state ends with its answer
  done(line);
}

function send(line) {
  const bytes = encode(`\n${token}${line}\n`);
  const length = apply(byteLengthOf, bytes, []);
  let off = 0;
  while (off < length) {
    // A partial write goes on from a new view made with the captured constructor, not with
    // subarray (which would consult bytes.constructor and Symbol.species, both the bundle's).
    const rest = off === 0 ? bytes : new Bytes(apply(bufferOf, bytes, []), apply(byteOffsetOf, bytes, []) + off, length - off);
    off += write(rest);
  }
}

// JSON.stringify quietly turns NaN into null and drops functions; a return value that is not
// JSON is an error instead, as in the Python runtime.
function strictJson(_key, value) {
  switch (typeof value) {
    case "number":
      if (!isFinite(value)) throw new TypeError(`${value} is not JSON`);
      return value;
    case "bigint":
    case "function":
    case "symbol":
      throw new TypeError(`a ${typeof value} is not JSON`);
  }
  if (
    value instanceof Map || value instanceof Set || value instanceof WeakMap ||
    value instanceof WeakSet || value instanceof Promise || value instanceof ArrayBuffer ||
    ArrayBuffer.isView(value)
  ) {
    throw new TypeError(`a ${value.constructor.name} is not JSON`);
  }
  return value;
}

// -- describing errors -----------------------------------------------------------------------

function errorName(e) {
  try {
    if (e !== null && typeof e === "object" && typeof e.name === "string" && e.name) return e.name;
  } catch { /* a throwing getter */ }
  return "Error";
}

function message(e) {
  try {
    if (e instanceof Error) return toText(e.message);
    if (typeof e === "string") return e;
    return stringify(e) ?? toText(e);
  } catch {
    return "(an unprintable value)";
  }
}

function lineOf(e) {
  let text = "";
  try {
    text = `${typeof e?.stack === "string" ? e.stack : ""}\n${message(e)}`;
  } catch { /* ignore */ }
  const at = text.indexOf(`${bundleUrl}:`);
  if (at < 0) return "";
  const m = /^:(\d+)/.exec(text.slice(at + bundleUrl.length));
  return m ? ` (line ${m[1]})` : "";
}

function describe(e) {
  try {
    let code = "";
    try {
      if (typeof e?.code === "string") code = ` [${e.code}]`;
    } catch { /* ignore */ }
    return `${errorName(e)}${code}: ${message(e)}${lineOf(e)}`;
  } catch { // the bundle may have broken what this uses (String.prototype.slice, RegExp.prototype.exec, ...)
    return "(an error that cannot be described)";
  }
}

class SystemExit extends Error {
  name = "SystemExit";
}

// A bundle that tries to end the process gets an exception instead (it would end without an
// answer otherwise); errors that escape the call (timers, forgotten promises) end the call.
Deno.exit = (code) => {
  throw new SystemExit(String(code ?? 0));
};
// globalThis.process is a lazy getter that loads Deno's Node compatibility layer (about 40 ms
// here): wrap the getter rather than touch the object, so bundles that never use it never pay.
const processProperty = Object.getOwnPropertyDescriptor(globalThis, "process");
if (processProperty?.get && processProperty.configurable) {
  Object.defineProperty(globalThis, "process", {
    ...processProperty,
    get() {
      const p = processProperty.get.call(this);
      try {
        p.exit = Deno.exit;
      } catch { /* not writable: fine */ }
      return p;
    },
  });
}
globalThis.close = () => Deno.exit(0);
globalThis.addEventListener("unhandledrejection", (ev) => {
  ev.preventDefault();
  answer(failure(describe(ev.reason), errorName(ev.reason)));
});
globalThis.addEventListener("error", (ev) => {
  ev.preventDefault();
  answer(failure(describe(ev.error ?? ev.message), errorName(ev.error)));
});

// -- HTTP-style endpoints --------------------------------------------------------------------

function toRequest(a) {
  a = a ?? {};
  const method = String(a.method || "GET").toUpperCase();
  let path = String(a.path || "/");
  if (!path.startsWith("/")) path = `/${path}`;
  const url = new URL(`http://bundle.invalid${path}`);
  for (const [k, v] of Object.entries(a.query ?? {})) {
    for (const item of Array.isArray(v) ? v : [v]) url.searchParams.append(k, String(item));
  }
  const headers = new Headers();
  for (const [k, v] of Object.entries(a.headers ?? {})) headers.append(k, String(v));
  let body;
  if (a.body != null && a.body !== "" && method !== "GET" && method !== "HEAD") {
    body = a.isBase64 ? Uint8Array.fromBase64(String(a.body)) : String(a.body);
  }
  return new Request(url, { method, headers, body });
}

const TEXTY = /^text\/|json|xml|javascript|ecmascript|x-www-form-urlencoded|csv|yaml|graphql/;

function encodeBody(bytes, contentType) {
  const ct = (contentType ?? "").toLowerCase();
  if (!ct || TEXTY.test(ct)) {
    try {
      return { body: new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(bytes), isBase64: false };
    } catch { /* not UTF-8: send the bytes */ }
  }
  return { body: bytes.toBase64(), isBase64: true };
}

function headerObject(entries) {
  const out = {};
  for (const [k, v] of entries) {
    const key = String(k);
    out[key] = key in out ? `${out[key]}, ${v}` : String(v);
  }
  return out;
}

// A Response, or a plain object with an integer status and a body, becomes `response`.
async function shapeResponse(value) {
  if (value instanceof Response) {
    const bytes = new Uint8Array(await value.arrayBuffer());
    return {
      status: value.status,
      headers: headerObject(value.headers),
      ...encodeBody(bytes, value.headers.get("content-type")),
    };
  }
  if (value !== null && typeof value === "object" && Number.isInteger(value.status) && "body" in value) {
    let body = value.body;
    let isBase64 = Boolean(value.isBase64);
    if (body instanceof ArrayBuffer) body = new Uint8Array(body);
    if (body instanceof Uint8Array) {
      body = body.toBase64();
      isBase64 = true;
    } else if (typeof body !== "string") {
      body = stringify(body, strictJson) ?? "";
    }
    return { status: value.status, headers: headerObject(Object.entries(value.headers ?? {})), body, isBase64 };
  }
  return null;
}

// -- the bundle's state (docs/protocol.md §7.6) ----------------------------------------------
// An endpoint that declares a second parameter (its length is 2 or more: one without a default)
// gets ctx as its second argument; one written before ctx existed is called as before. ctx.state: get(key), set(key, value), delete(key),
// list(prefix = "", limit = 100, cursor), each returning a promise. A call is a line on the
// answer channel (with the token, like the answer: a line the bundle writes itself is dropped),
// answered by the runner with one line on stdin before anything else runs. Each job's ctx
// knows its job's run: a call made after the job answered (a continuation left behind) fails
// instead of landing in another request.

let currentRun = null; // the run id of the job being served; null between jobs
const NO_STATE = "state is not available in this run (atrund exec offers none)";

function stateError(text, name) {
  const e = new Error(text);
  e.name = name;
  return e;
}

function stateCall(run, op, fields) {
  if (run == null) throw stateError(NO_STATE, "StateError");
  if (run !== currentRun) throw stateError("this ctx belongs to a request that has ended", "StateError");
  send(`{"state":"${op}","run":${stringify(run)}${fields}}`);
  const reply = nextJob();
  if (reply === null || typeof reply !== "object") {
    throw stateError("the runner did not answer the state call", "StateUnavailable");
  }
  if (reply.ok !== true) throw stateError(toText(reply.error ?? "the state call failed"), toText(reply.errorType ?? "StateError"));
  return reply;
}

function stateText(value, what) {
  if (typeof value !== "string") throw new TypeError(`a state ${what} must be a string, not ${typeof value}`);
  return stringify(value);
}

function contextFor(job) {
  const run = typeof job.run === "string" ? job.run : null;
  const state = Object.freeze({
    async get(key) {
      return stateCall(run, "get", `,"key":${stateText(key, "key")}`).value ?? null;
    },
    async set(key, value) {
      const keyText = stateText(key, "key");
      let text;
      try {
        text = stringify(value, strictJson);
      } catch (e) {
        throw new TypeError(`the value is not JSON: ${message(e)}`);
      }
      if (typeof text !== "string") throw new TypeError("the value is not JSON");
      stateCall(run, "set", `,"key":${keyText},"value":${text}`);
    },
    async delete(key) {
      stateCall(run, "delete", `,"key":${stateText(key, "key")}`);
    },
    async list(prefix = "", limit = 100, cursor = undefined) {
      if (!Number.isInteger(limit) || limit < 1 || limit > 1000) throw new RangeError("limit must be an integer from 1 to 1000");
      const after = cursor == null ? "" : `,"cursor":${stateText(cursor, "cursor")}`;
      const reply = stateCall(run, "list", `,"prefix":${stateText(prefix, "prefix")},"limit":${limit}${after}`);
      return { keys: reply.keys ?? [], cursor: reply.cursor ?? null };
    },
  });
  return Object.freeze({ state });
}

// -- the call --------------------------------------------------------------------------------

function isEndpoint(value) {
  if (typeof value !== "function") return false;
  try {
    return !/^class\b/.test(Function.prototype.toString.call(value));
  } catch {
    return true;
  }
}

// Timers the bundle starts are ended with the job that started them: nothing of one request
// runs on into the next (I/O already in flight cannot be recalled; docs/threat-model.md).
const realSetTimeout = setTimeout;
const realSetInterval = setInterval;
const realClearTimeout = clearTimeout;
const timers = new Set();
const addTimer = Set.prototype.add;
const deleteTimer = Set.prototype.delete;
const timerIds = Set.prototype.values;
const clearSet = Set.prototype.clear;
globalThis.setTimeout = (fn, delay, ...rest) => {
  const id = apply(realSetTimeout, globalThis, [(...a) => {
    apply(deleteTimer, timers, [id]);
    if (typeof fn === "function") apply(fn, globalThis, a);
  }, delay, ...rest]);
  apply(addTimer, timers, [id]);
  return id;
};
globalThis.setInterval = (fn, delay, ...rest) => {
  const id = apply(realSetInterval, globalThis, [fn, delay, ...rest]);
  apply(addTimer, timers, [id]);
  return id;
};
function endTimers() {
  for (const id of apply(timerIds, timers, [])) realClearTimeout(id);
  apply(clearSet, timers, []);
}
// A Worker is a thread that would outlive the job: bundles get none.
delete globalThis.Worker;

let mod;

async function call(job) {
  callStarted = null;
  if (mod === undefined) {
    const loadStarted = now();
    try {
      mod = await import(bundleUrl);
    } catch (e) {
      // Deno reports a module that does not parse as a TypeError whose message is the
      // parser's "SyntaxError: ..." diagnostic.
      const parsed = /^SyntaxError: ([^]*)$/.exec(message(e));
      if (parsed) {
        return failure(`bundle does not compile: SyntaxError: ${parsed[1].split("\n")[0]}${lineOf(e)}`, "SyntaxError", loadStarted);
      }
      const name = errorName(e);
      const what = name === "SyntaxError" ? "bundle does not compile" : "bundle failed while loading";
      return failure(`${what}: ${describe(e)}`, name, loadStarted);
    }
    loadTimeMs = ms(now() - loadStarted);
  } else {
    loadTimeMs = undefined;
  }

  const endpoint = toText(job.endpoint);
  const names = Object.keys(mod).filter((k) => !k.startsWith("_") && k !== "default" && isEndpoint(mod[k])).sort();
  if (!names.includes(endpoint)) {
    return failure(`unknown endpoint '${endpoint}': the bundle defines ${names.join(", ") || "none"}`, "UnknownEndpoint", null);
  }

  let args = job.args;
  if (endpoint === "handleRequest") {
    try {
      args = toRequest(args);
    } catch (e) {
      return failure(`handleRequest: the request cannot be made into a Request: ${describe(e)}`, errorName(e), null);
    }
  }

  callStarted = now();
  let value;
  try {
    const fn = mod[endpoint];
    value = fn.length >= 2 ? fn(args, contextFor(job)) : fn(args);
    if (value !== null && (typeof value === "object" || typeof value === "function") && typeof value.then === "function") {
      value = await value;
    }
  } catch (e) {
    return failure(describe(e), errorName(e));
  }

  if (endpoint === "handleRequest") {
    let response;
    try {
      response = await shapeResponse(value);
    } catch (e) {
      return failure(`handleRequest: the response cannot be read: ${describe(e)}`, errorName(e));
    }
    if (response) return success("response", response);
  }
  return success("data", value);
}

// One job after another, each answered before the next is read. Jobs after the first carry the
// same bundle (at-run-exec checks), and no token.
for (let next = job; next !== null; next = nextJob()) {
  const line = await new Promise((resolve) => {
    settle = resolve;
    currentRun = typeof next.run === "string" ? next.run : null;
    call(next).then(answer, (e) => answer(failure(describe(e), errorName(e))));
  });
  endTimers();
  send(line);
}
realExit(0);
