// Read a file the bundle was not granted (the runner's app password, /etc/shadow).
import { readFileSync } from "node:fs";
export function main(args) {
  try { return { read: readFileSync(args.path, "utf8") }; } catch (e) { return { denied: e.code ?? e.name }; }
}
