// Package nbd serves disk.Image values over the Network Block Device
// protocol, and has a small client for tests and for the daemon itself.
//
// The protocol reference is doc/proto.md of github.com/NetworkBlockDevice/nbd.
// The server speaks the fixed newstyle handshake and, in transmission,
// structured replies with hole chunks, the base:allocation and
// qemu:allocation-depth metadata contexts, FUA, multiple connections per
// export (CAN_MULTI_CONN) and STARTTLS. Everything is big-endian.
//
// Handshake (one TCP or unix stream; S = server, C = client):
//
//	S: "NBDMAGIC"(8) "IHAVEOPT"(8) handshake flags(2: FIXED_NEWSTYLE|NO_ZEROES)
//	C: client flags(4)
//	repeat:
//	  C: "IHAVEOPT"(8) option(4) length(4) data(length)
//	  S: 0x3e889045565a9(8) option(4) reply type(4) length(4) data(length)
//	     … zero or more replies (INFO, SERVER, META_CONTEXT), then ACK or an
//	     error (bit 31 set)
//	until GO is acknowledged (or EXPORT_NAME, which is answered by
//	size(8) transmission flags(2) [124 zero bytes]).
//
//	GO/INFO data:   name length(4) name  n(2) info types(2 each)
//	INFO replies:   EXPORT: type=0(2) size(8) flags(2)
//	                BLOCK_SIZE: type=3(2) min(4) preferred(4) max(4)
//	META_CONTEXT:   export length(4) export  n(4) {query length(4) query}
//	  reply:        context id(4) name
//
// Transmission (requests may be pipelined; replies come in any order and
// carry the request's cookie):
//
//	C: 0x25609513(4) command flags(2) type(2) cookie(8) offset(8) length(4)
//	   [length bytes of data for WRITE]
//	S simple reply:     0x67446698(4) error(4) cookie(8) [data for READ]
//	S structured chunk: 0x668e33ef(4) flags(2: DONE) type(2) cookie(8)
//	                    length(4) payload(length)
//	   OFFSET_DATA  offset(8) data
//	   OFFSET_HOLE  offset(8) hole length(4)
//	   BLOCK_STATUS context id(4) {extent length(4) status flags(4)}…
//	   ERROR        error(4) message length(2) message
//
// A Server holds named Exports. All connections to one export share its
// Image, so a FLUSH on any of them makes every acknowledged write
// durable. Serve accepts on any net.Listener (including one inherited by
// socket activation), ServeConn serves one connected socket, Shutdown
// drains in-flight requests and flushes. RemoveExport ends an export's
// connections and returns once nothing can reach its image any more, so
// the caller may close it.
//
// What clients can cost is bounded, each bound a Server field (and a
// flag of vhdkit nbd, and of vhdkit serve prefixed nbd-):
//
//   - ConnMemory (64 MiB, at least MaxPayload): the payload one
//     connection holds — write data being executed, read data being
//     sent, block status replies and the extents they are made from. A
//     client that sends requests and never reads the replies stalls its
//     own connection there. A BLOCK_STATUS asks the image about no more
//     than its reply can carry (with REQ_ONE, about its first extent).
//   - HandshakeTimeout (30 s): the whole option haggling, however slowly
//     the client sends it. Within it, at most 1024 options and 4 MiB of
//     option headers and data (4 more options and 32 KiB more per export,
//     for nbdinfo --list, which asks about every export); past either the
//     connection is closed and the refusal logged.
//   - MaxConns (1024): connections served at once; one more is closed
//     before the greeting, and logged.
//   - Besides its payload, a connection holds less than 256 KiB:
//     measured, about 72 KiB while it negotiates (a 64 KiB read buffer, a
//     goroutine) and 112 KiB in transmission (a reader and 16 workers,
//     the default Workers).
//
// Requests read from a connection that has died are dropped, not
// executed. So all clients together make the server hold at most
//
//	MaxConns × (ConnMemory + 256 KiB)
//
// — 64.25 GiB with the defaults, reached only by 1024 clients each
// keeping 64 MiB of replies unread: a server open to untrusted clients
// should lower MaxConns or ConnMemory. 500 idle clients cost about 55 MiB.
// TestHostileClientBudget measures each kind of hostile client (malformed
// handshakes, option floods, slow handshakes, idle connections, replies
// never read, all at once) and logs the figures in lines starting
// "nbd-budget:".
//
// Requests a hostile or buggy client gets wrong are answered with the
// protocol's errors: EINVAL (unknown command or flag, misaligned, read or
// trim past the end, oversized write), ENOSPC (write past the end), EPERM
// (writes to a read-only export), EOVERFLOW (read over 32 MiB), ENOTSUP
// (fast zero that would not be fast). A WRITE's payload is always
// consumed, so the stream stays in step; only a bad request magic, which
// loses the framing, ends the connection.
package nbd
