// Fake the metrics: replace the clocks and rounding the wrapper measures executionTimeMs with
// (performance.now, Math.round, process.hrtime, Date.now), so the answer claims 4242 ms (or
// 10^15 ms, which the PDS would refuse in a result record). Expected: the wrapper measures with
// the functions it captured before the bundle was imported.
performance.now = () => 1e15;
Math.round = () => 4242;
process.hrtime = () => [4242, 0];
process.hrtime.bigint = () => 4242000000000n;
Date.now = () => 1e15;

export function main() {
  return { real: true };
}
