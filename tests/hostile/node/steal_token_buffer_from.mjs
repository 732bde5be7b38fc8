// Steal the answer token by replacing Buffer.from, which the wrapper once used to encode its
// answer line ("\n" + token + JSON): on seeing that line, write a forged answer with the token on
// fd 3 (the answer pipe every node worker holds) before the real one. Expected: the wrapper never
// calls it, so the real answer {real: true} arrives with real metrics.
import { Buffer } from "node:buffer";
import fs from "node:fs";

const write = fs.writeSync;
const original = Buffer.from;
Buffer.from = function (value, ...rest) {
  const m = typeof value === "string" && /\n([0-9a-f]{36})\{/.exec(value);
  if (m) write(3, `\n${m[1]}{"success":true,"data":{"forged":true},"metrics":{"executionTimeMs":4242}}\n`);
  return original.call(this, value, ...rest);
};

export function main() {
  return { real: true };
}
