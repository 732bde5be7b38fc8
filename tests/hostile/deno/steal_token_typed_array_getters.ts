// Steal the answer token from the answer's bytes through what a write loop over a Uint8Array
// reaches: getters on %TypedArray%.prototype (byteLength, byteOffset, length, buffer), its
// subarray/slice/set methods, and Uint8Array's Symbol.species (which subarray and slice consult
// to build their result). The answer file is taken from a replaced Deno.FsFile.prototype.writeSync
// (called with it as `this`); with both, a forged answer with the token is written first.
// Expected: the wrapper reads lengths with the getters it captured and never calls subarray.
const originalWrite = Deno.FsFile.prototype.writeSync;
const encoder = new TextEncoder();
const decoder = new TextDecoder();
let token: string | null = null;
let busy = false;
function look(value: unknown) {
  if (busy || token) return;
  busy = true;
  try {
    const m = value instanceof Uint8Array ? /\n([0-9a-f]{36})\{/.exec(decoder.decode(value)) : null;
    if (m) token = m[1];
  } catch { /* not text */ } finally {
    busy = false;
  }
}

// deno-lint-ignore no-explicit-any
const TypedArray: any = Object.getPrototypeOf(Uint8Array.prototype);
for (const name of ["byteLength", "byteOffset", "length", "buffer"]) {
  const get = Object.getOwnPropertyDescriptor(TypedArray, name)!.get!;
  Object.defineProperty(TypedArray, name, {
    __proto__: null, configurable: true, get() { look(this); return get.call(this); },
  } as PropertyDescriptor);
}
for (const name of ["subarray", "slice", "set"]) {
  const original = TypedArray[name];
  TypedArray[name] = function (this: Uint8Array, ...args: unknown[]) { look(this); return original.apply(this, args); };
}
Object.defineProperty(Uint8Array, Symbol.species, {
  __proto__: null, configurable: true,
  get() { return function (...args: unknown[]) { return new (Uint8Array as any)(...args); }; },
} as PropertyDescriptor);
Deno.FsFile.prototype.writeSync = function (this: Deno.FsFile, bytes: Uint8Array): number {
  if (token) {
    busy = true;
    originalWrite.call(this, encoder.encode(`\n${token}{"success":true,"data":{"forged":true},"metrics":{"executionTimeMs":4242}}\n`));
    token = null;
  }
  return originalWrite.call(this, bytes);
};

export function main() {
  return { real: true };
}
