// Steal the answer token by replacing TextEncoder.prototype.encode (the wrapper encodes its
// answer line, "\n" + token + JSON, into bytes), and take the answer file from the first call of
// a replaced Deno.FsFile.prototype.writeSync; with both, write a forged answer with the token.
// Expected: the wrapper uses the encode and writeSync it bound before loading the bundle, so
// neither hook is ever called with its data.
const originalWrite = Deno.FsFile.prototype.writeSync;
const originalEncode = TextEncoder.prototype.encode;
const encoder = new TextEncoder();
let token: string | null = null;
TextEncoder.prototype.encode = function (this: TextEncoder, value?: string): Uint8Array {
  const m = typeof value === "string" ? /\n([0-9a-f]{36})\{/.exec(value) : null;
  if (m) token = m[1];
  return originalEncode.call(this, value);
};
Deno.FsFile.prototype.writeSync = function (this: Deno.FsFile, bytes: Uint8Array): number {
  if (token) {
    originalWrite.call(this, originalEncode.call(encoder,
      `\n${token}{"success":true,"data":{"forged":true},"metrics":{"executionTimeMs":4242}}\n`));
    token = null;
  }
  return originalWrite.call(this, bytes);
};

export function main() {
  return { real: true };
}
