// Connect to a loopback TCP port that was not granted.
export async function main(args: { port: number }) {
  try {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: args.port });
    conn.close();
    return { connected: true };
  } catch (e) {
    return { connected: false, why: (e as Error).name };
  }
}
