// Start a program (a shell, to do anything the runtime forbids).
export async function main() {
  try {
    const out = await new Deno.Command("sh", { args: ["-c", "echo spawned"] }).output();
    return { spawned: new TextDecoder().decode(out.stdout).trim() };
  } catch (e) {
    return { denied: (e as Error).name };
  }
}
