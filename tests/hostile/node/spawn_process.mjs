// Start a program (a shell, to do anything the runtime forbids).
import { execFileSync } from "node:child_process";
export function main() {
  try { return { spawned: execFileSync("sh", ["-c", "echo spawned"]).toString().trim() }; } catch (e) { return { denied: e.code ?? e.name }; }
}
