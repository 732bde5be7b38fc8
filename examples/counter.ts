// A counter with durable state, in Deno (TypeScript): each call of `hit` adds one and answers the new count.
// An endpoint that declares a second parameter gets `ctx` as its second argument; `ctx.state` is this bundle's key-value state
// on the runner (docs/protocol.md §7.6): get, set, delete and list, each returning a promise.
// Writes commit with the run's result, and only if the run succeeds.

type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
type Ctx = {
  state: {
    get(key: string): Promise<Json>;
    set(key: string, value: Json): Promise<void>;
    delete(key: string): Promise<void>;
    list(prefix?: string, limit?: number, cursor?: string): Promise<{ keys: string[]; cursor: string | null }>;
  };
};

export async function hit(args: { name?: string }, ctx: Ctx) {
  const hits = (((await ctx.state.get("hits")) as number | null) ?? 0) + 1;
  await ctx.state.set("hits", hits);
  if (args.name) await ctx.state.set(`by/${args.name}`, hits); // one key per name: list them with a prefix
  return { hits };
}

export async function names(args: { cursor?: string }, ctx: Ctx) {
  const page = await ctx.state.list("by/", 100, args.cursor);
  return { names: page.keys.map((key) => key.slice(3)), cursor: page.cursor };
}

export async function reset(_args: unknown, ctx: Ctx) {
  await ctx.state.delete("hits");
  return { hits: 0 };
}
