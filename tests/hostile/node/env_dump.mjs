// Dump the environment, and the runner's through /proc, looking for secrets.
import { readdirSync, readFileSync } from "node:fs";
export function main(args) {
  const found = { own: { ...process.env }, others: [] };
  try {
    for (const pid of readdirSync("/proc")) {
      if (!/^\d+$/.test(pid)) continue;
      try { if (readFileSync(`/proc/${pid}/environ`, "utf8").includes(args.canary)) found.others.push(pid); } catch { /* denied */ }
    }
  } catch { /* /proc itself denied */ }
  return found;
}
