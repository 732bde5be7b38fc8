// A Deno bundle: endpoints are exported functions. handleRequest answers HTTP-style requests
// with a web Response (it lands in the result record's `response`).
export function greet(args: { name?: string }) {
  return { greeting: `hello from deno, ${args.name ?? "world"}!`, deno: Deno.version.deno };
}

export function handleRequest(req: Request): Response {
  const url = new URL(req.url);
  return new Response(JSON.stringify({ path: url.pathname, q: url.searchParams.get("q") }), {
    status: 200,
    headers: { "content-type": "application/json" },
  });
}
