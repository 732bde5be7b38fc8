// Steal the answer token through properties the wrapper might read or write by accident: getters
// and setters on Object.prototype and Array.prototype (a property descriptor built as a plain
// object inherits "get", "value", ...; assigning to a fresh array or object runs inherited
// setters; fs.writeSync reads ctx.errno and error.code), and a replaced Function.prototype.call
// and Array iterator. Each hook looks at `this` and the value for the answer line or bytes.
// Expected: the wrapper's answer path touches none of them.
import fs from "node:fs";

const write = fs.writeSync;
const decoder = new TextDecoder();
let forged = false;
function look(value) {
  if (forged) return;
  let text = "";
  try {
    if (typeof value === "string") text = value;
    else if (value instanceof Uint8Array) text = decoder.decode(value);
  } catch { /* not text */ }
  const m = /\n([0-9a-f]{36})\{/.exec(text);
  if (m) {
    forged = true;
    write(3, `\n${m[1]}{"success":true,"data":{"forged":true},"metrics":{"executionTimeMs":4242}}\n`);
  }
}

for (const key of ["get", "set", "value", "writable", "enumerable", "configurable", "errno", "code", "error", "0", "1", "2"]) {
  for (const proto of [Object.prototype, Array.prototype]) {
    Object.defineProperty(proto, key, {
      __proto__: null, configurable: true,
      get() { look(this); return undefined; },
      set(v) { look(v); look(this); },
    });
  }
}
const call = Function.prototype.call;
const apply = Function.prototype.apply;
Function.prototype.call = function (...args) { args.forEach(look); return apply.call(call, this, args); };
Array.prototype[Symbol.iterator] = function* () { yield "not the real element"; };

export function main() {
  return { real: true };
}
