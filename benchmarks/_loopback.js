// Preload (node -r) for the Node benchmark scripts: a server.listen(port) without a host
// binds 127.0.0.1 instead of every interface. The benchmarks only ever bind loopback.
'use strict';
const net = require('net');
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === 'number' && typeof args[1] !== 'string') args.splice(1, 0, '127.0.0.1');
  return listen.apply(this, args);
};
