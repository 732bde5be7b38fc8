// CPU spin past the timeout.
export function main() { while (true) { /* spin */ } }
