// The Node runtime's self-test bundle: `atrund exec nix/runtimes/node/test-bundle.mjs --runtime node --endpoint test --args '{}'` prints OK.

export function test(args) {
  return { ok: true, echo: args };
}
