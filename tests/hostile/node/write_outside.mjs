// Write outside the granted paths.
import { writeFileSync } from "node:fs";
export function main(args) {
  try { writeFileSync(args.path, "pwned"); return { wrote: args.path }; } catch (e) { return { denied: e.code ?? e.name }; }
}
