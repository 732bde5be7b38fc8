// A Node bundle (ES module): endpoints are exported functions, awaited if they return a promise.
export async function greet(args) {
  return { greeting: `hello from node, ${args.name ?? "world"}!`, node: process.version };
}
