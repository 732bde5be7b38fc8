// Steal the answer token and the answer file at once: replace Deno.FsFile.prototype.writeSync,
// which the wrapper once looked up when it wrote its answer. The hook is called with the open
// answer FIFO as `this` (the bundle cannot open it itself: the wrapper revoked that write
// permission) and the answer bytes ("\n" + token + JSON), and writes a forged answer with the
// token first. Expected: the wrapper writes with the writeSync it bound before loading the bundle.
const original = Deno.FsFile.prototype.writeSync;
const encoder = new TextEncoder();
const decoder = new TextDecoder();
Deno.FsFile.prototype.writeSync = function (this: Deno.FsFile, bytes: Uint8Array): number {
  const m = /\n([0-9a-f]{36})\{/.exec(decoder.decode(bytes));
  if (m) {
    original.call(this, encoder.encode(`\n${m[1]}{"success":true,"data":{"forged":true},"metrics":{"executionTimeMs":4242}}\n`));
  }
  return original.call(this, bytes);
};

export function main() {
  return { real: true };
}
