// Dump the environment, and the runner's through /proc, looking for secrets.
export function main(args: { canary: string }) {
  const found: { own: Record<string, string> | string; others: string[] } = { own: {}, others: [] };
  try { found.own = Deno.env.toObject(); } catch (e) { found.own = (e as Error).name; }
  try {
    for (const entry of Deno.readDirSync("/proc")) {
      if (!/^\d+$/.test(entry.name)) continue;
      try { if (Deno.readTextFileSync(`/proc/${entry.name}/environ`).includes(args.canary)) found.others.push(entry.name); } catch { /* denied */ }
    }
  } catch { /* /proc itself denied */ }
  return found;
}
