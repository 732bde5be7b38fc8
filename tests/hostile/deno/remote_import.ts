// Import remote code at run time: an https: module and an npm: package.
export async function main() {
  const out: Record<string, string> = {};
  for (const spec of ["https://deno.land/std@0.224.0/fmt/colors.ts", "npm:left-pad@1.3.0"]) {
    try { await import(spec); out[spec] = "imported"; } catch (e) { out[spec] = (e as Error).name; }
  }
  return out;
}
