#!/usr/bin/env node
// A qlora-server client in Node.js: lists the adapters (ListAdapters), then generates (Generate, or GenerateStream
// with --stream) and prints the text on stdout; the adapter list, finish reason and token counts go to stderr,
// so stdout is only the answer (as with `qlora-server generate`). A failed RPC prints `error: CODE: details` to
// stderr and exits 1; bad arguments exit 2.
//
//   npm ci
//   node generate.js --target localhost:50051 --adapter my-adapter --prompt "Hello" --max-new-tokens 32 [--stream]
//
// Why the .proto file and not server reflection: the proto in this repository is the API's source of truth and
// @grpc/proto-loader turns it into typed service constructors at run time (no code-generation step), with just the
// two packages of package.json. Reflection would need a third package (@grpc/grpc-js has no reflection client)
// and an extra round trip before the first call; it is the better fit for ad-hoc tools such as
// `grpcurl -plaintext localhost:50051 list`. Any language with gRPC can do the same as this file with that proto.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', '..', 'protos');
const PROTO_FILE = path.join(PROTO_ROOT, 'qlora_server', 'v1', 'qlora_server.proto');

const USAGE = `usage: node generate.js [--target HOST:PORT] [--api-key KEY] [--adapter ID] [--prompt TEXT]
                        [--max-new-tokens N] [--timeout SECONDS] [--stream]

  --target HOST:PORT    server address (default localhost:50051)
  --api-key KEY         sent as 'authorization: Bearer KEY' metadata (servers started with --api-keys-file)
  --adapter ID          a registered adapter; empty (the default) = the base model
  --prompt TEXT         the prompt (default "Hello")
  --max-new-tokens N    tokens to generate at most (default: the server's, 256)
  --timeout SECONDS     deadline of each call (default 60)
  --stream              use GenerateStream and print the text as it arrives
Greedy decoding (temperature 0, the proto's default), so the same request always gives the same text.`;

/** Parse `--name value`, `--name=value` and the `--stream` / `--help` switches; exits 2 on anything else. */
function parseArgs(argv) {
  const opts = {target: 'localhost:50051', apiKey: '', adapter: '', prompt: 'Hello', maxNewTokens: null,
                timeout: 60, stream: false};
  const valued = {'--target': 'target', '--api-key': 'apiKey', '--adapter': 'adapter', '--prompt': 'prompt',
                  '--max-new-tokens': 'maxNewTokens', '--timeout': 'timeout'};
  const fail = (msg) => {
    process.stderr.write(`${USAGE}\ngenerate.js: error: ${msg}\n`);
    process.exit(2);
  };
  for (let i = 0; i < argv.length; i++) {
    const [name, inline] = argv[i].startsWith('--') && argv[i].includes('=')
      ? [argv[i].slice(0, argv[i].indexOf('=')), argv[i].slice(argv[i].indexOf('=') + 1)]
      : [argv[i], undefined];
    if (name === '--help' || name === '-h') {
      process.stdout.write(`${USAGE}\n`);
      process.exit(0);
    } else if (name === '--stream' && inline === undefined) {
      opts.stream = true;
    } else if (name in valued) {
      const value = inline !== undefined ? inline : argv[++i];
      if (value === undefined) fail(`${name} needs a value`);
      opts[valued[name]] = value;
    } else {
      fail(`unknown argument ${JSON.stringify(argv[i])}`);
    }
  }
  if (opts.maxNewTokens !== null) {
    // The server validates the range (1 .. its limit) and names the field; here only "is it an integer".
    if (!/^\d+$/.test(opts.maxNewTokens)) fail(`--max-new-tokens: not a whole number: ${opts.maxNewTokens}`);
    opts.maxNewTokens = Number(opts.maxNewTokens);
  }
  opts.timeout = Number(opts.timeout);
  if (!(opts.timeout > 0)) fail('--timeout: must be a number of seconds > 0');
  return opts;
}

/** The `qlora_server.v1` package of the proto: service constructors and message types. */
function loadApi() {
  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names as in the proto (adapter_id, max_new_tokens), not camelCase
    longs: String, // int64/uint64 (size_bytes, seed, version) as decimal strings: no precision lost
    enums: String, // enum values by name, e.g. 'FINISH_REASON_LENGTH'
    defaults: true, // unset fields read as their proto3 defaults ('' / 0 / false) instead of undefined
    oneofs: true, // a oneof (and proto3 `optional`) also names the field that is set
  });
  return grpc.loadPackageDefinition(definition).qlora_server.v1;
}

/** Per-call options: a deadline `seconds` from now. */
function callOptions(seconds) {
  return {deadline: new Date(Date.now() + seconds * 1000)};
}

/** The metadata of every call: the API key the way server/rpc/auth.py reads it, or nothing. */
function callMetadata(apiKey) {
  const md = new grpc.Metadata();
  if (apiKey) md.set('authorization', `Bearer ${apiKey}`);
  return md;
}

/** A unary call as a promise. */
function unary(client, method, request, metadata, options) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, options, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

/** 'FINISH_REASON_LENGTH' -> 'length', 'RESIDENCY_GPU' -> 'gpu'. */
function shortName(enumName, prefix) {
  return String(enumName).replace(prefix, '').toLowerCase();
}

function printSummary(finishReason, promptTokens, completionTokens) {
  process.stderr.write(`finish_reason=${shortName(finishReason, 'FINISH_REASON_')} prompt_tokens=${promptTokens} ` +
                       `completion_tokens=${completionTokens}\n`);
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const api = loadApi();
  // Plaintext, as `qlora-server serve` listens by default; for a TLS server use grpc.credentials.createSsl(ca).
  const credentials = grpc.credentials.createInsecure();
  const adapters = new api.Adapters(opts.target, credentials);
  const generation = new api.Generation(opts.target, credentials);
  const metadata = callMetadata(opts.apiKey);
  try {
    const listed = await unary(adapters, 'ListAdapters', {}, metadata, callOptions(opts.timeout));
    process.stderr.write(`adapters: ${listed.adapters.length}\n`);
    for (const a of listed.adapters) {
      process.stderr.write(`  ${a.adapter_id} rank=${a.rank} alpha=${a.lora_alpha} ` +
                           `residency=${shortName(a.residency, 'RESIDENCY_')} base_model=${a.base_model}\n`);
    }

    // temperature is left at 0 (greedy); unset max_new_tokens lets the server pick its default.
    const request = {adapter_id: opts.adapter, prompt: opts.prompt};
    if (opts.maxNewTokens !== null) request.max_new_tokens = opts.maxNewTokens;

    if (!opts.stream) {
      const reply = await unary(generation, 'Generate', request, metadata, callOptions(opts.timeout));
      process.stdout.write(`${reply.text}\n`);
      printSummary(reply.finish_reason, reply.prompt_tokens, reply.completion_tokens);
    } else {
      // Each message carries the new text; the last one also finish_reason and the token counts.
      const last = await new Promise((resolve, reject) => {
        let final = null;
        const call = generation.GenerateStream(request, metadata, callOptions(opts.timeout));
        call.on('data', (piece) => {
          process.stdout.write(piece.text);
          if (piece.finish_reason !== 'FINISH_REASON_UNSPECIFIED') final = piece;
        });
        call.on('error', reject);
        call.on('end', () => resolve(final));
      });
      process.stdout.write('\n');
      if (last) printSummary(last.finish_reason, last.prompt_tokens, last.completion_tokens);
    }
  } catch (err) {
    if (err.code === undefined) throw err; // not a gRPC status: a bug here, see the stack below
    // grpc.status maps both ways (5 <-> 'NOT_FOUND'), so the code prints by name as the Python CLI does.
    const details = String(err.details || '').replace(/\s+/g, ' ').trim(); // one line, like the Python CLI
    process.stderr.write(`error: ${grpc.status[err.code]}: ${details}\n`);
    process.exitCode = 1; // not process.exit(): stdout still flushes
  } finally {
    adapters.close();
    generation.close();
  }
}

main().catch((err) => {
  process.stderr.write(`${err.stack || err}\n`);
  process.exitCode = 1;
});
