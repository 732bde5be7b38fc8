// Steal the answer token from the answer's bytes: fs.writeSync reads buffer.byteLength, a getter
// on %TypedArray%.prototype that a bundle may redefine (byteOffset, length and buffer too), so the
// getter is called with the answer bytes as `this`. Also replace fs.writeSync itself and the
// Symbol.species of Uint8Array (which subarray/slice consult). Expected: the wrapper gives its
// bytes an own byteLength and uses the writeSync it captured, so none of these sees them.
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

const TypedArray = Object.getPrototypeOf(Uint8Array.prototype);
for (const name of ["byteLength", "byteOffset", "length", "buffer"]) {
  const get = Object.getOwnPropertyDescriptor(TypedArray, name).get;
  Object.defineProperty(TypedArray, name, { __proto__: null, configurable: true, get() { look(this); return get.call(this); } });
}
for (const name of ["subarray", "slice", "set"]) {
  const original = TypedArray[name];
  TypedArray[name] = function (...args) { look(this); return original.apply(this, args); };
}
Object.defineProperty(Uint8Array, Symbol.species, {
  __proto__: null, configurable: true, get() { return function (...args) { look(args[0]); return new Uint8Array(...args); }; },
});
fs.writeSync = function (fd, data, ...rest) {
  look(data);
  return write(fd, data, ...rest);
};

export function main() {
  return { real: true };
}
