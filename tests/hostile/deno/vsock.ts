// With a `*` network grant, ask whether vsock (the hypervisor or other guests) is granted, or
// connect to it, or listen on it. Deno's permission query reports `vsock:` as granted under
// `--allow-net` (it has no wildcard to deny vsock with); Deno ends the process when a bundle
// uses its unstable vsock transport without `--unstable-vsock`.
export async function main(args: { try: "query" | "connect" | "listen" }) {
  if (args.try === "query") {
    return { reported: (await Deno.permissions.query({ name: "net", host: "vsock:2:5005" })).state };
  }
  if (args.try === "connect") {
    // @ts-ignore: vsock is an unstable transport, absent from the stable types
    (await Deno.connect({ transport: "vsock", cid: 2, port: 5005 })).close();
  } else {
    // @ts-ignore: as above
    Deno.listen({ transport: "vsock", cid: -1, port: 5006 }).close();
  }
  return { [args.try]: true };
}
