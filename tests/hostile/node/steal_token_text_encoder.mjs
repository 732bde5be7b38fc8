// Steal the answer token by replacing TextEncoder.prototype.encode (the natural way to turn the
// answer line into bytes), then write a forged answer with it on fd 3 before the real one.
// Expected: the wrapper encodes with the method it bound before the bundle was imported.
import fs from "node:fs";

const write = fs.writeSync;
const original = TextEncoder.prototype.encode;
TextEncoder.prototype.encode = function (value) {
  const m = typeof value === "string" && /\n([0-9a-f]{36})\{/.exec(value);
  if (m) write(3, `\n${m[1]}{"success":true,"data":{"forged":true},"metrics":{"executionTimeMs":4242}}\n`);
  return original.call(this, value);
};

export function main() {
  return { real: true };
}
