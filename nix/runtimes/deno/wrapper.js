// The trusted wrapper for Deno bundles: Deno's main module, started by at-run-exec with the
// flags of one request. It reads the job on stdin, opens the answer FIFO and gives up its own
// write permission to it, then loads the bundle with a runtime-built import() (checked
// against --allow-read, unlike a static import), calls the endpoint and writes one answer
// line, prefixed with the job's token, on the FIFO. See at-run-exec for the whole picture.

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

// Read synchronously: `new Response(Deno.stdin.readable)` would load the web streams code
// first, about 20 ms here.
function readStdin() {
  const chunks = [];
  let total = 0;
  const buf = new Uint8Array(1 << 16);
  for (;;) {
    const n = Deno.stdin.readSync(buf);
    if (n === null) break;
    chunks.push(buf.slice(0, n));
    total += n;
  }
  const all = new Uint8Array(total);
  let off = 0;
  for (const c of chunks) {
    all.set(c, off);
    off += c.length;
  }
  return new TextDecoder().decode(all);
}

const job = JSON.parse(readStdin());
const token = toText(job.token);
const answerFile = Deno.openSync(job.answerPath, { write: true });
const write = answerFile.writeSync.bind(answerFile);
Deno.permissions.revokeSync({ name: "write", path: job.answerPath });

const bundleUrl = (() => {
  const url = new URL("file:///");
  url.pathname = job.codePath;
  return url.href;
})();

let answered = false;
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

function answer(line) {
  if (answered) return;
  answered = true;
  const bytes = encode(`\n${token}${line}\n`);
  const length = apply(byteLengthOf, bytes, []);
  let off = 0;
  while (off < length) {
    // A partial write goes on from a new view made with the captured constructor, not with
    // subarray (which would consult bytes.constructor and Symbol.species, both the bundle's).
    const rest = off === 0 ? bytes : new Bytes(apply(bufferOf, bytes, []), apply(byteOffsetOf, bytes, []) + off, length - off);
    off += write(rest);
  }
  realExit(0);
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

// -- the call --------------------------------------------------------------------------------

function isEndpoint(value) {
  if (typeof value !== "function") return false;
  try {
    return !/^class\b/.test(Function.prototype.toString.call(value));
  } catch {
    return true;
  }
}

const loadStarted = now();
let mod;
try {
  mod = await import(bundleUrl);
} catch (e) {
  // Deno reports a module that does not parse as a TypeError whose message is the
  // parser's "SyntaxError: ..." diagnostic.
  const parse = /^SyntaxError: ([^]*)$/.exec(message(e));
  if (parse) {
    answer(failure(`bundle does not compile: SyntaxError: ${parse[1].split("\n")[0]}${lineOf(e)}`, "SyntaxError", loadStarted));
  }
  const name = errorName(e);
  const what = name === "SyntaxError" ? "bundle does not compile" : "bundle failed while loading";
  answer(failure(`${what}: ${describe(e)}`, name, loadStarted));
}
loadTimeMs = ms(now() - loadStarted);

const endpoint = toText(job.endpoint);
const names = Object.keys(mod).filter((k) => !k.startsWith("_") && k !== "default" && isEndpoint(mod[k])).sort();
if (!names.includes(endpoint)) {
  answer(failure(`unknown endpoint '${endpoint}': the bundle defines ${names.join(", ") || "none"}`, "UnknownEndpoint", null));
}

let args = job.args;
if (endpoint === "handleRequest") {
  try {
    args = toRequest(args);
  } catch (e) {
    answer(failure(`handleRequest: the request cannot be made into a Request: ${describe(e)}`, errorName(e), null));
  }
}

callStarted = now();
let value;
try {
  value = mod[endpoint](args);
  if (value !== null && (typeof value === "object" || typeof value === "function") && typeof value.then === "function") {
    value = await value;
  }
} catch (e) {
  answer(failure(describe(e), errorName(e)));
}

let response = null;
if (endpoint === "handleRequest") {
  try {
    response = await shapeResponse(value);
  } catch (e) {
    answer(failure(`handleRequest: the response cannot be read: ${describe(e)}`, errorName(e)));
  }
}
answer(response ? success("response", response) : success("data", value));
