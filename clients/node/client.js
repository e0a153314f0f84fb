#!/usr/bin/env node
// Command-line client of layerline's public API, in Node.js.
//
// Loads protos/coordinator.proto at run time (no generated code), calls
// Coordinator.Generate or Coordinator.GenerateStream and prints one JSON line:
//
//   {"text": "...", "token_ids": [...], "finish_reason": "FINISH_REASON_LENGTH"}
//
// For --mode stream the text and token ids of all messages are concatenated and
// finish_reason is the one of the last message.
//
// Exit status: 0 on success; on a failed call, the gRPC status code (1-16) with
// {"error": {"code": N, "status": "NAME", "message": "..."}} on stderr; 64 for
// bad command-line arguments.
//
// Usage:
//   node client.js --address 127.0.0.1:50050 --prompt "Hello" \
//       [--max-new-tokens N] [--mode unary|stream] [--deadline-ms N] [--api-key KEY]
//
// With --api-key, or else LAYERLINE_API_KEY in the environment, every call carries the
// metadata "authorization: Bearer KEY" (for a coordinator started with --api-keys).
//
// The Go client in ../go takes the same flags and prints the same JSON.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const EXIT_USAGE = 64;
const PROTO_PATH = path.resolve(__dirname, '..', '..', 'protos', 'coordinator.proto');

const USAGE = `usage: client.js --address HOST:PORT --prompt TEXT [--max-new-tokens N]
                 [--mode unary|stream] [--deadline-ms N] [--api-key KEY]

  --address HOST:PORT   the coordinator (plaintext)
  --prompt TEXT         raw prompt text
  --max-new-tokens N    tokens to generate (0: the server default)
  --mode unary|stream   Generate (default) or GenerateStream
  --deadline-ms N       call deadline in milliseconds (0: none)
  --api-key KEY         sent as 'authorization: Bearer KEY' (default: $LAYERLINE_API_KEY)

Loads ${PROTO_PATH}.`;

function usageError(message) {
  process.stderr.write(`client.js: ${message}\n${USAGE}\n`);
  process.exit(EXIT_USAGE);
}

function parseInteger(name, value) {
  if (!/^\d+$/.test(value)) {
    usageError(`--${name} wants a non-negative integer, got ${JSON.stringify(value)}`);
  }
  return Number(value);
}

function parseArgs(argv) {
  const options = {
    address: '', prompt: '', maxNewTokens: 0, mode: 'unary', deadlineMs: 0,
    apiKey: process.env.LAYERLINE_API_KEY || '',
  };
  const known = new Set(['address', 'prompt', 'max-new-tokens', 'mode', 'deadline-ms', 'api-key']);
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '-h' || arg === '--help') {
      process.stdout.write(`${USAGE}\n`);
      process.exit(0);
    }
    // Accept --name value, --name=value, and the single-dash forms Go's flag package takes.
    const match = /^--?([a-z-]+)(?:=([\s\S]*))?$/.exec(arg);
    if (!match || !known.has(match[1])) usageError(`unknown argument ${JSON.stringify(arg)}`);
    const name = match[1];
    let value = match[2];
    if (value === undefined) {
      if (i + 1 >= argv.length) usageError(`--${name} needs a value`);
      value = argv[++i];
    }
    switch (name) {
      case 'address': options.address = value; break;
      case 'prompt': options.prompt = value; break;
      case 'max-new-tokens': options.maxNewTokens = parseInteger(name, value); break;
      case 'deadline-ms': options.deadlineMs = parseInteger(name, value); break;
      case 'api-key': options.apiKey = value; break;
      case 'mode':
        if (value !== 'unary' && value !== 'stream') usageError(`--mode is unary or stream, got ${JSON.stringify(value)}`);
        options.mode = value;
        break;
      default: usageError(`unknown argument ${JSON.stringify(arg)}`);
    }
  }
  if (!options.address) usageError('--address is required');
  options.apiKey = options.apiKey.trim();
  // A bearer token's characters; anything else could not travel as a header value.
  if (options.apiKey && !/^[A-Za-z0-9\-._~+/=]+$/.test(options.apiKey)) {
    usageError('the API key (--api-key or LAYERLINE_API_KEY) has characters a bearer token cannot have');
  }
  return options;
}

function loadCoordinator(protoPath) {
  const definition = protoLoader.loadSync(protoPath, {
    keepCase: true, // field names as in the .proto: token_ids, finish_reason
    enums: String, // finish_reason as its name, e.g. FINISH_REASON_LENGTH
    longs: String,
    defaults: true, // unset fields read as their proto3 defaults ("" / [] / first enum value)
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).layerline.v1.Coordinator;
}

const STATUS_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

function fail(err) {
  const code = typeof err.code === 'number' ? err.code : grpc.status.UNKNOWN;
  const error = { code, status: STATUS_NAMES[code] || 'UNKNOWN', message: err.details || err.message || String(err) };
  process.stderr.write(`${JSON.stringify({ error })}\n`);
  process.exitCode = code === grpc.status.OK ? grpc.status.UNKNOWN : code;
}

function emit(text, tokenIds, finishReason) {
  process.stdout.write(`${JSON.stringify({ text, token_ids: tokenIds, finish_reason: finishReason })}\n`);
}

function main() {
  const options = parseArgs(process.argv.slice(2));
  const Coordinator = loadCoordinator(PROTO_PATH);
  const client = new Coordinator(options.address, grpc.credentials.createInsecure());
  const request = { prompt: options.prompt, max_new_tokens: options.maxNewTokens };
  const metadata = new grpc.Metadata();
  if (options.apiKey) metadata.set('authorization', `Bearer ${options.apiKey}`);
  const callOptions = {};
  if (options.deadlineMs > 0) callOptions.deadline = new Date(Date.now() + options.deadlineMs);
  const done = (err) => {
    if (err) fail(err);
    client.close();
  };

  if (options.mode === 'unary') {
    client.Generate(request, metadata, callOptions, (err, response) => {
      if (!err) emit(response.text, response.token_ids.map(Number), response.finish_reason);
      done(err);
    });
    return;
  }

  let text = '';
  const tokenIds = [];
  let finishReason = 'FINISH_REASON_UNSPECIFIED';
  let failed = false;
  let ended = false;
  let succeeded = false;
  // Print once both the stream has ended (every 'data' seen) and its status is OK.
  const finishIfDone = () => {
    if (!ended || !succeeded) return;
    emit(text, tokenIds, finishReason);
    done(null);
  };
  const call = client.GenerateStream(request, metadata, callOptions);
  call.on('data', (message) => {
    text += message.text;
    for (const id of message.token_ids) tokenIds.push(Number(id));
    finishReason = message.finish_reason;
  });
  call.on('error', (err) => {
    if (failed) return;
    failed = true;
    done(err);
  });
  call.on('status', (status) => {
    // On failure 'error' carries the status and reports it.
    if (failed || status.code !== grpc.status.OK) return;
    succeeded = true;
    finishIfDone();
  });
  call.on('end', () => {
    ended = true;
    finishIfDone();
  });
}

main();
