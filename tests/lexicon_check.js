'use strict'
// Checks atrund's lexicons with the official validator (@atproto/lexicon, installed with the
// local PDS). Reads {"records": [[nsid, value], ...]} on stdin; prints one JSON line per record:
// {"ok": true} or {"ok": false, "error": "..."}. Exits 1 if a lexicon document itself is invalid.
const fs = require('node:fs')
const path = require('node:path')
const { createRequire } = require('node:module')
const { Lexicons, jsonToLex } = createRequire(path.join(__dirname, '../localstack/package.json'))('@atproto/lexicon')

const STRONG_REF = {
  lexicon: 1,
  id: 'com.atproto.repo.strongRef',
  defs: { main: { type: 'object', required: ['uri', 'cid'], properties: { uri: { type: 'string', format: 'at-uri' }, cid: { type: 'string', format: 'cid' } } } },
}

function walk(dir) {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? walk(path.join(dir, e.name)) : e.name.endsWith('.json') ? [path.join(dir, e.name)] : [])
}

let lex
try {
  const docs = walk(path.join(__dirname, '../lexicons')).map((f) => JSON.parse(fs.readFileSync(f, 'utf8')))
  lex = new Lexicons([STRONG_REF, ...docs])
} catch (e) {
  console.log(JSON.stringify({ lexiconError: String(e.message || e) }))
  process.exit(1)
}
const input = JSON.parse(fs.readFileSync(0, 'utf8'))
for (const [nsid, value] of input.records) {
  try {
    // "nsid#input" / "nsid#output": the body of an XRPC call or answer; "nsid#params": a query's
    // parameters; else a record.
    const [id, part] = nsid.split('#')
    if (part === 'params') lex.assertValidXrpcParams(id, value)
    else if (part === 'input') lex.assertValidXrpcInput(id, jsonToLex(value))
    else if (part === 'output') lex.assertValidXrpcOutput(id, jsonToLex(value))
    else lex.assertValidRecord(nsid, jsonToLex(value))
    console.log(JSON.stringify({ ok: true }))
  } catch (e) {
    console.log(JSON.stringify({ ok: false, error: String(e.message || e) }))
  }
}
