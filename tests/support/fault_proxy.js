#!/usr/bin/env node
// Fault-injecting HTTP proxy for the S3 tests: sits between imgfs and s3rver on 127.0.0.1 and,
// when armed through control requests to itself, answers the next matching requests with the
// failures a real object store produces (TESTING.md "Injecting faults"). Node's http module only,
// so it needs nothing from npm.
//
// Usage: node fault_proxy.js --target http://127.0.0.1:PORT [--port N]
//   Listens on 127.0.0.1 (port N, or a free one when N is 0 or absent), prints the port on
//   stdout once listening, logs to stderr, and exits 0 on SIGTERM or SIGINT.
//
// Control requests (never forwarded):
//   POST /__fault?mode=M&count=N&match=S   arm a rule; N requests whose URL contains S get fault M
//                                          (count -1 = until cleared; match absent = every request)
//     M = 503     503 SlowDown with an S3 XML error body
//         500     500 InternalError with an S3 XML error body
//         reset   the connection is reset without an answer
//         short   the real answer's headers, with its full Content-Length, then half the body, then
//                 the connection is closed
//         delay   the real answer, after ms=MS milliseconds (also written mode=delay=MS)
//         down    every request is dropped by closing its connection, until cleared (count ignored)
//   POST /__fault/clear                    disarm every rule
//   GET  /__fault/stats                    JSON: requests seen, forwarded, faults per mode,
//                                          rules still armed
// Rules are checked in the order they were armed; the first one that matches and has requests
// left fires. Everything stays on loopback: a non-loopback target is refused.
'use strict';

const fs = require('fs');
const http = require('http');

const kModes = ['503', '500', 'reset', 'short', 'delay', 'down'];
const kLoopbackHosts = new Set(['127.0.0.1', 'localhost', '[::1]', '::1']);

function fail(message) {
  process.stderr.write(`fault_proxy: ${message}\n`);
  process.exit(2);
}

function parseArguments(argv) {
  const options = { target: null, port: 0 };
  for (let i = 0; i < argv.length; i++) {
    const value = argv[i + 1];
    if (argv[i] === '--target' && value !== undefined) {
      options.target = value;
      i++;
    } else if (argv[i] === '--port' && value !== undefined) {
      options.port = Number(value);
      i++;
    } else if (argv[i] === '--tls-cert' && value !== undefined) {
      options.tlsCert = value;
      i++;
    } else if (argv[i] === '--tls-key' && value !== undefined) {
      options.tlsKey = value;
      i++;
    } else {
      fail(`unknown argument '${argv[i]}' (usage: --target http://127.0.0.1:PORT [--port N] ` +
           '[--tls-cert PEM --tls-key PEM])');
    }
  }
  if (options.target === null) fail('--target is required');
  let target;
  try {
    target = new URL(options.target);
  } catch (error) {
    fail(`--target '${options.target}' is not a URL`);
  }
  if (target.protocol !== 'http:') fail('--target must be an http:// URL');
  if (!kLoopbackHosts.has(target.hostname)) fail('--target must be a loopback address');
  if (!Number.isInteger(options.port) || options.port < 0 || options.port > 65535) {
    fail('--port must be an integer from 0 to 65535');
  }
  if ((options.tlsCert === undefined) !== (options.tlsKey === undefined)) {
    fail('--tls-cert and --tls-key go together');
  }
  return { target, port: options.port, tlsCert: options.tlsCert, tlsKey: options.tlsKey };
}

const { target, port: listenPort, tlsCert, tlsKey } = parseArguments(process.argv.slice(2));
const upstreamAgent = new http.Agent({ keepAlive: true });

let rules = [];
const stats = {
  requests: 0,
  forwarded: 0,
  faults: Object.fromEntries(kModes.map((mode) => [mode, 0])),
};

function s3Error(res, status, code, message, resource) {
  const body =
    '<?xml version="1.0" encoding="UTF-8"?>\n' +
    `<Error><Code>${code}</Code><Message>${message}</Message>` +
    `<Resource>${resource.replace(/&/g, '&amp;').replace(/</g, '&lt;')}</Resource>` +
    '<RequestId>FAULTPROXY</RequestId></Error>';
  res.writeHead(status, {
    'Content-Type': 'application/xml',
    'Content-Length': Buffer.byteLength(body),
  });
  res.end(body);
}

function sendJson(res, status, value) {
  const body = JSON.stringify(value) + '\n';
  res.writeHead(status, {
    'Content-Type': 'application/json',
    'Content-Length': Buffer.byteLength(body),
  });
  res.end(body);
}

// A reset (RST) rather than an orderly close, where this Node has it, as a crashed peer does.
function resetSocket(socket) {
  if (typeof socket.resetAndDestroy === 'function') {
    socket.resetAndDestroy();
  } else {
    socket.destroy();
  }
}

function safeDecode(text) {
  try {
    return decodeURIComponent(text);
  } catch (error) {
    return text;
  }
}

// Both the raw and the decoded URL are tried, so "disk image+1" matches "disk%20image%2B1".
function takeRule(url) {
  const decoded = safeDecode(url);
  for (const rule of rules) {
    if (rule.mode !== 'down' && rule.remaining === 0) continue;
    if (rule.match !== '' && !url.includes(rule.match) && !decoded.includes(rule.match)) continue;
    if (rule.mode !== 'down' && rule.remaining > 0) rule.remaining--;
    return rule;
  }
  return null;
}

function parseRule(query) {
  let mode = query.get('mode') || '';
  let delayMs = Number(query.get('ms') || '0');
  const delayMatch = /^delay[=:](\d+)$/.exec(mode);
  if (delayMatch) {
    mode = 'delay';
    delayMs = Number(delayMatch[1]);
  }
  if (!kModes.includes(mode)) return { error: `unknown mode '${mode}' (one of ${kModes})` };
  const count = Number(query.get('count') || '1');
  if (!Number.isInteger(count) || count < -1) return { error: 'count must be an integer >= -1' };
  if (!Number.isInteger(delayMs) || delayMs < 0) return { error: 'ms must be an integer >= 0' };
  return { mode, remaining: count, match: query.get('match') || '', delayMs };
}

function handleControl(req, res, url) {
  req.resume();
  if (req.method === 'GET' && url.pathname === '/__fault/stats') {
    sendJson(res, 200, { ...stats, armed: rules });
  } else if (req.method === 'POST' && url.pathname === '/__fault/clear') {
    rules = [];
    sendJson(res, 200, { cleared: true });
  } else if (req.method === 'POST' && url.pathname === '/__fault') {
    const rule = parseRule(url.searchParams);
    if (rule.error) {
      sendJson(res, 400, { error: rule.error });
      return;
    }
    rules.push(rule);
    sendJson(res, 200, { armed: rule });
  } else {
    sendJson(res, 404, { error: `no control endpoint ${req.method} ${url.pathname}` });
  }
}

const kHopByHop = new Set([
  'connection',
  'keep-alive',
  'proxy-connection',
  'transfer-encoding',
  'upgrade',
  'te',
  'trailer',
]);

function withoutHopByHop(headers) {
  const copy = {};
  for (const [name, value] of Object.entries(headers)) {
    if (!kHopByHop.has(name.toLowerCase())) copy[name] = value;
  }
  return copy;
}

// Sends the request on unchanged (Host included: virtual-host buckets and SigV2 depend on it).
function forward(req, res, shortBody) {
  stats.forwarded++;
  const upstream = http.request({
    protocol: target.protocol,
    hostname: target.hostname.replace(/^\[|\]$/g, ''),
    port: target.port,
    method: req.method,
    path: req.url,
    headers: withoutHopByHop(req.headers),
    agent: upstreamAgent,
  });
  upstream.on('response', (answer) => {
    const headers = withoutHopByHop(answer.headers);
    res.writeHead(answer.statusCode, answer.statusMessage, headers);
    if (!shortBody) {
      answer.pipe(res);
      return;
    }
    const declared = Number(answer.headers['content-length'] || '0');
    let allowance = Math.floor(declared / 2);
    const cut = () => {
      answer.destroy();
      res.socket.destroy();
    };
    res.flushHeaders();
    if (allowance === 0) {
      cut();
      return;
    }
    answer.on('data', (chunk) => {
      if (allowance === 0) return;
      const piece = chunk.length <= allowance ? chunk : chunk.subarray(0, allowance);
      allowance -= piece.length;
      if (allowance === 0) {
        res.write(piece, cut);
      } else {
        res.write(piece);
      }
    });
    answer.on('end', () => {
      if (allowance !== 0) cut();
    });
  });
  upstream.on('error', (error) => {
    if (res.headersSent) {
      res.socket?.destroy();
    } else {
      s3Error(res, 502, 'BadGateway', `fault_proxy upstream: ${error.message}`, req.url);
    }
  });
  res.on('close', () => {
    if (!res.writableFinished) upstream.destroy();
  });
  req.pipe(upstream);
}

function handleRequest(req, res) {
  const url = new URL(req.url, 'http://proxy.invalid');
  if (url.pathname === '/__fault' || url.pathname.startsWith('/__fault/')) {
    handleControl(req, res, url);
    return;
  }
  stats.requests++;
  const rule = takeRule(req.url);
  if (rule === null) {
    forward(req, res, false);
    return;
  }
  stats.faults[rule.mode]++;
  switch (rule.mode) {
    case '503':
      req.resume();
      s3Error(res, 503, 'SlowDown', 'Please reduce your request rate.', req.url);
      break;
    case '500':
      req.resume();
      s3Error(res, 500, 'InternalError', 'We encountered an internal error. Please try again.',
              req.url);
      break;
    case 'reset':
      resetSocket(req.socket);
      break;
    case 'down':
      req.socket.destroy();
      break;
    case 'short':
      forward(req, res, true);
      break;
    case 'delay': {
      const timer = setTimeout(() => forward(req, res, false), rule.delayMs);
      res.on('close', () => clearTimeout(timer));
      break;
    }
  }
}

// With --tls-cert/--tls-key the proxy speaks HTTPS to its clients (to test TLS verification).
const server = tlsCert === undefined
  ? http.createServer(handleRequest)
  : require('https').createServer(
      { cert: fs.readFileSync(tlsCert), key: fs.readFileSync(tlsKey) }, handleRequest);
const sockets = new Set();
server.on('connection', (socket) => {
  sockets.add(socket);
  socket.on('close', () => sockets.delete(socket));
});
server.on('error', (error) => fail(error.message));

function shutDown() {
  server.close(() => process.exit(0));
  for (const socket of sockets) socket.destroy();
  upstreamAgent.destroy();
}
process.on('SIGTERM', shutDown);
process.on('SIGINT', shutDown);

server.listen(listenPort, '127.0.0.1', () => {
  process.stdout.write(`${server.address().port}\n`);
});
