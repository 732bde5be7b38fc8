'use strict'
/*
 * A local AT Protocol network for atrund's demo and tests: the reference PDS
 * (@atproto/pds, sqlite + blobs on disk) and a PLC directory (@did-plc/server
 * with its in-memory database), both bound to 127.0.0.1 only.
 *
 * Run with Node >= 22 (the PDS needs it; localstack/install.sh provides it):
 *
 *   node stack.js --data-dir DIR --pds-port P --plc-port Q
 *
 * (or PDS_DATA_DIRECTORY / PDS_PORT / PLC_PORT in the environment).
 *
 * stdout carries exactly one line, once both services answer:
 *   {"ready": true, "pds": "http://localhost:P", "plc": "http://localhost:Q"}
 * Everything else goes to stderr. PDS/PLC logs stay off unless LOG_ENABLED=true.
 *
 * The process exits on SIGTERM/SIGINT and when its stdin reaches EOF, so a
 * parent that dies without cleaning up never leaves a stack running.
 */

const crypto = require('node:crypto')
const fs = require('node:fs')
const path = require('node:path')
const { parseArgs } = require('node:util')

// Keep stdout for the ready line alone. The PDS/PLC loggers (pino) write to
// stdout by default and read these variables when their modules load, so this
// must happen before the packages are required/imported below.
if (process.env.LOG_ENABLED && !process.env.LOG_DESTINATION) {
  process.env.LOG_DESTINATION = '/dev/stderr'
}
console.log = console.info = console.debug = console.error

const SHUTDOWN_GRACE_MS = 5000

function readOptions() {
  const { values } = parseArgs({
    options: {
      'data-dir': { type: 'string' },
      'pds-port': { type: 'string' },
      'plc-port': { type: 'string' },
    },
  })
  const dataDir = values['data-dir'] ?? process.env.PDS_DATA_DIRECTORY
  const pdsPort = Number(values['pds-port'] ?? process.env.PDS_PORT ?? 2583)
  const plcPort = Number(values['plc-port'] ?? process.env.PLC_PORT ?? 2582)
  if (!dataDir) throw new Error('--data-dir (or PDS_DATA_DIRECTORY) is required')
  for (const port of [pdsPort, plcPort]) {
    // Port 0 cannot work: the PDS publishes its URL (with the port) in DID documents.
    if (!Number.isInteger(port) || port < 1 || port > 65535) {
      throw new Error(`invalid port: ${port}`)
    }
  }
  return { dataDir: path.resolve(dataDir), pdsPort, plcPort }
}

/**
 * Secrets come from the environment, else from DIR/secrets.json, else are
 * generated and saved there: a reused data directory needs the same JWT secret
 * (sessions) and PLC rotation key (DID updates) as the run that created it.
 */
function loadSecrets(dataDir) {
  const file = path.join(dataDir, 'secrets.json')
  let saved = {}
  if (fs.existsSync(file)) saved = JSON.parse(fs.readFileSync(file, 'utf8'))
  const hex = (bytes) => crypto.randomBytes(bytes).toString('hex')
  const secrets = {
    jwtSecret: saved.jwtSecret ?? hex(32),
    adminPassword: saved.adminPassword ?? hex(16),
    // Any 32 random bytes are a valid secp256k1 key with overwhelming probability.
    plcRotationKeyK256PrivateKeyHex: saved.plcRotationKeyK256PrivateKeyHex ?? hex(32),
  }
  fs.writeFileSync(file, JSON.stringify(secrets, null, 2) + '\n', { mode: 0o600 })
  return {
    jwtSecret: process.env.PDS_JWT_SECRET ?? secrets.jwtSecret,
    adminPassword: process.env.PDS_ADMIN_PASSWORD ?? secrets.adminPassword,
    plcRotationKeyK256PrivateKeyHex:
      process.env.PDS_PLC_ROTATION_KEY_K256_PRIVATE_KEY_HEX ??
      secrets.plcRotationKeyK256PrivateKeyHex,
  }
}

/**
 * PDS.start() and PlcServer.start() both call `this.app.listen(port)`, and
 * express then listens on every interface. Pin the host on the app instead of
 * re-implementing start().
 */
function listenOnLoopback(app) {
  const listen = app.listen.bind(app)
  app.listen = (port, ...rest) => listen(port, '127.0.0.1', ...rest)
}

/**
 * The PLC database lives in memory, but the PDS keeps its accounts on disk.
 * Journal every accepted PLC operation to DIR/plc-ops.jsonl and replay it at
 * start, so that a reused data directory still resolves its DIDs.
 */
async function journalPlc(db, file) {
  if (fs.existsSync(file)) {
    const lines = fs.readFileSync(file, 'utf8').split('\n').filter(Boolean)
    for (const line of lines) {
      const { did, op } = JSON.parse(line)
      await db.validateAndAddOp(did, op)
    }
  }
  const validateAndAddOp = db.validateAndAddOp.bind(db)
  db.validateAndAddOp = async (did, op) => {
    await validateAndAddOp(did, op)
    fs.appendFileSync(file, JSON.stringify({ did, op }) + '\n')
  }
}

async function waitUntilAnswering(url, deadlineMs = 10000) {
  const deadline = Date.now() + deadlineMs
  for (;;) {
    try {
      const res = await fetch(url)
      if (res.ok) return
    } catch (err) {
      if (Date.now() > deadline) throw new Error(`${url} does not answer: ${err}`)
    }
    if (Date.now() > deadline) throw new Error(`${url} does not answer`)
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
}

async function main() {
  const { dataDir, pdsPort, plcPort } = readOptions()
  const blobDir = path.join(dataDir, 'blobs')
  fs.mkdirSync(blobDir, { recursive: true })

  const { PlcServer, Database: PlcDatabase } = require('@did-plc/server')
  const { PDS, envToCfg, envToSecrets } = await import('@atproto/pds')

  const services = []
  let stopping = false
  const stop = async (why) => {
    if (stopping) return
    stopping = true
    process.stderr.write(`stack: stopping (${why})\n`)
    setTimeout(() => process.exit(1), SHUTDOWN_GRACE_MS).unref()
    for (const service of services.reverse()) {
      try {
        await service.destroy()
      } catch (err) {
        process.stderr.write(`stack: error while stopping: ${err}\n`)
      }
    }
    process.exit(0)
  }
  for (const sig of ['SIGTERM', 'SIGINT']) {
    process.on(sig, () => (stopping ? process.exit(1) : stop(sig)))
  }
  process.stdin.on('end', () => stop('stdin closed'))
  process.stdin.on('error', () => stop('stdin error'))
  process.stdin.resume()

  const plcDb = PlcDatabase.mock()
  await journalPlc(plcDb, path.join(dataDir, 'plc-ops.jsonl'))
  const plc = PlcServer.create({ db: plcDb, port: plcPort })
  listenOnLoopback(plc.app)
  await plc.start()
  services.push(plc)

  // Use the host name: the PDS's did:plc client and the DID documents it
  // writes must say "localhost", not "127.0.0.1".
  const plcUrl = `http://localhost:${plcPort}`
  const env = {
    port: pdsPort,
    hostname: 'localhost', // => public URL http://localhost:P, handles *.test
    devMode: true,
    inviteRequired: false,
    crawlers: [],
    didPlcUrl: plcUrl,
    dataDirectory: dataDir,
    blobstoreDiskLocation: blobDir,
    blobUploadLimit: Number(process.env.PDS_BLOB_UPLOAD_LIMIT ?? 64 * 1024 * 1024),
    ...loadSecrets(dataDir),
  }
  const pds = await PDS.create(envToCfg(env), envToSecrets(env))
  listenOnLoopback(pds.app)
  await pds.start()
  services.push(pds)

  const pdsUrl = `http://localhost:${pdsPort}`
  await waitUntilAnswering(`${plcUrl}/_health`)
  await waitUntilAnswering(`${pdsUrl}/xrpc/_health`)
  if (!stopping) {
    process.stdout.write(JSON.stringify({ ready: true, pds: pdsUrl, plc: plcUrl }) + '\n')
  }
}

main().catch((err) => {
  process.stderr.write(`stack: failed to start: ${err?.stack ?? err}\n`)
  process.exit(1)
})
