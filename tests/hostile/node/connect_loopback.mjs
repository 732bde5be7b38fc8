// Connect to a loopback TCP port that was not granted (Node 22 has no network permission).
import { connect } from "node:net";
export function main(args) {
  return new Promise((resolve) => {
    const s = connect({ host: "127.0.0.1", port: args.port }, () => { s.destroy(); resolve({ connected: true }); });
    s.on("error", (e) => resolve({ connected: false, why: e.code }));
  });
}
