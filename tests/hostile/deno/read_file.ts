// Read a file the bundle was not granted (the runner's app password, /etc/shadow).
export function main(args: { path: string }) {
  try {
    return { read: Deno.readTextFileSync(args.path) };
  } catch (e) {
    return { denied: (e as Error).name };
  }
}
