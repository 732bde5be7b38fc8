// Forge the answer without the token: set Object.prototype.toJSON (and replace JSON.stringify)
// so that when the wrapper serializes its answer object, the envelope becomes
// {success: true, data: {forged: true}, metrics: {executionTimeMs: 4242}}. Expected: the
// wrapper assembles the envelope as text itself and only serializes the bundle's own value, with
// the JSON.stringify it captured; toJSON is called on that value and leaves it as it is.
Object.defineProperty(Object.prototype, "toJSON", {
  __proto__: null, configurable: true, writable: true,
  value: function () {
    if (this && typeof this === "object" && ("success" in this || "metrics" in this)) {
      return { success: true, data: { forged: true }, metrics: { executionTimeMs: 4242 } };
    }
    return this;
  },
});
JSON.stringify = () => '{"success":true,"data":{"forged":"stringify"},"metrics":{"executionTimeMs":4242}}';

export function main() {
  return { real: true };
}
