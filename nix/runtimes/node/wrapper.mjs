// The trusted wrapper for Node bundles: node's entry point, started by at-run-exec with the
// --permission flags of one reuse key (one bundle, one set of grants and secrets). It reads the
// first job on stdin, imports the bundle (.mjs), calls the endpoint and writes one answer line,
// prefixed with the first job's token, on fd 3; then it serves each further job line (same
// bundle, no token) the same way, until stdin ends. See at-run-exec for the whole picture.

import { Buffer } from "node:buffer";
import fs from "node:fs";
import { pathToFileURL } from "node:url";

// -- the answer channel ----------------------------------------------------------------------
// Bundle code runs in this realm and may rewrite any global or prototype before the wrapper
// writes its answer: a replaced Buffer.from, TextEncoder.prototype.encode, a byteLength getter
// on %TypedArray%.prototype or a setter on Object.prototype would see the answer line, and so
// the job's token, and could then write answer lines of its own. So everything the answer path
// uses is captured here, before the bundle is imported, and the token and the answer bytes are
// only ever handed to these captured functions (never stored in a property, never passed to a
// method looked up later). The envelope (success, metrics) is assembled as text from trusted
// pieces: only the bundle's own value goes through JSON.stringify, so an Object.prototype.toJSON
// can change that value but not the envelope around it. The runner checks every answer anyway
// (atrund.execute.protocol.parse_answer): this keeps the answer the wrapper's, with real metrics.

const ANSWER_FD = 3;
const MAX_ERROR = 16384; // characters of an error message sent (results keep 4000 bytes)
const MAX_ERROR_TYPE = 128;
const apply = Reflect.apply;
const defineProperty = Reflect.defineProperty;
const byteLengthOf = Object.getOwnPropertyDescriptor(Object.getPrototypeOf(Uint8Array.prototype), "byteLength").get;
const sliceString = String.prototype.slice;
const toText = String;
const round = Math.round;
const isFinite = Number.isFinite;
const encoder = new TextEncoder();
const encode = encoder.encode.bind(encoder); // node's encode: a brand check and a native call
const now = performance.now.bind(performance);
const realExit = process.exit.bind(process);
const writeSync = fs.writeSync;
const stringify = JSON.stringify;
const sleepCell = new Int32Array(new SharedArrayBuffer(4));
const wait = Atomics.wait;

const readSync = fs.readSync;
const parse = JSON.parse;
let input = Buffer.alloc(0);

// The next job line from at-run-exec, or null when it closed our stdin. Read synchronously:
// between two jobs nothing of the bundle should run.
function nextJob() {
  for (;;) {
    const nl = input.indexOf(10);
    if (nl >= 0) {
      const line = input.subarray(0, nl).toString("utf8");
      input = input.subarray(nl + 1);
      return parse(line);
    }
    const buf = Buffer.alloc(1 << 16);
    let n;
    try {
      n = readSync(0, buf, 0, buf.length, null);
    } catch (e) {
      if (e?.code !== "EAGAIN") throw e;
      wait(sleepCell, 0, 0, 5);
      continue;
    }
    if (n === 0) return null;
    input = Buffer.concat([input, buf.subarray(0, n)]);
  }
}

const job = nextJob();
const token = toText(job.token);
const bundleUrl = pathToFileURL(job.codePath).href;

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
  // fs.writeSync reads buffer.byteLength, a prototype getter the bundle could redefine to see
  // these bytes: give them an own, plain value (null prototype: no inherited get/set in it).
  defineProperty(bytes, "byteLength", { __proto__: null, value: length });
  let off = 0;
  while (off < length) {
    try {
      off += writeSync(ANSWER_FD, bytes, off, length - off);
    } catch (e) {
      if (e?.code !== "EAGAIN") realExit(70); // no answer: the runner reports how the worker ended
      wait(sleepCell, 0, 0, 5);
    }
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
process.exit = (code) => {
  throw new SystemExit(String(code ?? 0));
};
process.on("uncaughtException", (e) => answer(failure(describe(e), errorName(e))));
process.on("unhandledRejection", (e) => answer(failure(describe(e), errorName(e))));

// -- HTTP-style endpoints --------------------------------------------------------------------
// handleRequest gets the request object as sent ({method, path, query, headers, body,
// isBase64}); it may return a web Response or {status, headers, body, isBase64}.

const TEXTY = /^text\/|json|xml|javascript|ecmascript|x-www-form-urlencoded|csv|yaml|graphql/;

function encodeBody(bytes, contentType) {
  const ct = (contentType ?? "").toLowerCase();
  if (!ct || TEXTY.test(ct)) {
    try {
      return { body: new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(bytes), isBase64: false };
    } catch { /* not UTF-8: send the bytes */ }
  }
  return { body: Buffer.from(bytes).toString("base64"), isBase64: true };
}

function headerObject(entries) {
  const out = {};
  for (const [k, v] of entries) {
    const key = String(k);
    out[key] = key in out ? `${out[key]}, ${v}` : String(v);
  }
  return out;
}

async function shapeResponse(value) {
  if (typeof Response === "function" && value instanceof Response) {
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
      body = Buffer.from(body).toString("base64");
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
const realSetImmediate = setImmediate;
const realClearTimeout = clearTimeout;
const realClearImmediate = clearImmediate;
const timers = new Set();
const immediates = new Set();
const addTo = Set.prototype.add;
const deleteFrom = Set.prototype.delete;
const valuesOf = Set.prototype.values;
const clearSet = Set.prototype.clear;
function tracked(start, set) {
  return (fn, ...rest) => {
    const handle = apply(start, globalThis, [(...a) => {
      apply(deleteFrom, set, [handle]);
      if (typeof fn === "function") apply(fn, globalThis, a);
    }, ...rest]);
    apply(addTo, set, [handle]);
    return handle;
  };
}
globalThis.setTimeout = tracked(realSetTimeout, timers);
globalThis.setImmediate = tracked(realSetImmediate, immediates);
globalThis.setInterval = (fn, ...rest) => {
  const handle = apply(realSetInterval, globalThis, [fn, ...rest]);
  apply(addTo, timers, [handle]);
  return handle;
};
function endTimers() {
  for (const t of apply(valuesOf, timers, [])) realClearTimeout(t);
  for (const t of apply(valuesOf, immediates, [])) realClearImmediate(t);
  apply(clearSet, timers, []);
  apply(clearSet, immediates, []);
}

let mod;

async function call(job) {
  callStarted = null;
  if (mod === undefined) {
    const loadStarted = now();
    try {
      mod = await import(bundleUrl);
    } catch (e) {
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

  callStarted = now();
  let value;
  try {
    const fn = mod[endpoint];
    value = fn.length >= 2 ? fn(job.args, contextFor(job)) : fn(job.args);
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
