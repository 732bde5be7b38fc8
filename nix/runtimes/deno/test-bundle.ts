// The Deno runtime's self-test bundle: `atrund exec nix/runtimes/deno/test-bundle.ts --runtime deno --endpoint test --args '{}'` prints OK.

export function test(args: Record<string, unknown>): { ok: boolean; echo: Record<string, unknown> } {
  return { ok: true, echo: args };
}
