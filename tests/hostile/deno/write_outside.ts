// Write outside the granted paths.
export function main(args: { path: string }) {
  try {
    Deno.writeTextFileSync(args.path, "pwned");
    return { wrote: args.path };
  } catch (e) {
    return { denied: (e as Error).name };
  }
}
