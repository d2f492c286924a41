package nbd

import (
	"encoding/binary"
	"fmt"
)

// Magic numbers. All integers on the wire are big-endian.
const (
	magicInit           = 0x4e42444d41474943 // "NBDMAGIC", first 8 bytes from the server
	magicOpt            = 0x49484156454F5054 // "IHAVEOPT", handshake and every option
	magicOptReply       = 0x3e889045565a9    // every fixed-newstyle option reply
	magicRequest        = 0x25609513         // every transmission request
	magicSimpleReply    = 0x67446698         // simple reply
	magicStructuredRepl = 0x668e33ef         // structured reply chunk
)

// Handshake flags (server, 16 bits) and client flags (32 bits).
const (
	flagFixedNewstyle = 1 << 0
	flagNoZeroes      = 1 << 1

	clientFlagFixedNewstyle = 1 << 0
	clientFlagNoZeroes      = 1 << 1
)

// Transmission flags, sent with the export size.
const (
	FlagHasFlags        = 1 << 0
	FlagReadOnly        = 1 << 1
	FlagSendFlush       = 1 << 2
	FlagSendFUA         = 1 << 3
	FlagRotational      = 1 << 4
	FlagSendTrim        = 1 << 5
	FlagSendWriteZeroes = 1 << 6
	FlagSendDF          = 1 << 7
	FlagCanMultiConn    = 1 << 8
	FlagSendCache       = 1 << 10
	FlagSendFastZero    = 1 << 11
)

// Option types.
const (
	optExportName      = 1
	optAbort           = 2
	optList            = 3
	optStartTLS        = 5
	optInfo            = 6
	optGo              = 7
	optStructuredReply = 8
	optListMetaContext = 9
	optSetMetaContext  = 10
)

// Option reply types; errors have bit 31 set.
const (
	repAck         = 1
	repServer      = 2
	repInfo        = 3
	repMetaContext = 4

	repFlagError        = 1 << 31
	repErrUnsup         = repFlagError | 1
	repErrPolicy        = repFlagError | 2
	repErrInvalid       = repFlagError | 3
	repErrPlatform      = repFlagError | 4
	repErrTLSReqd       = repFlagError | 5
	repErrUnknown       = repFlagError | 6
	repErrShutdown      = repFlagError | 7
	repErrBlockSizeReqd = repFlagError | 8
	repErrTooBig        = repFlagError | 9
)

// Information types inside NBD_REP_INFO.
const (
	infoExport      = 0
	infoName        = 1
	infoDescription = 2
	infoBlockSize   = 3
)

// Command types.
const (
	CmdRead        = 0
	CmdWrite       = 1
	CmdDisc        = 2
	CmdFlush       = 3
	CmdTrim        = 4
	CmdCache       = 5
	CmdWriteZeroes = 6
	CmdBlockStatus = 7
)

// Command flags.
const (
	CmdFlagFUA      = 1 << 0
	CmdFlagNoHole   = 1 << 1
	CmdFlagDF       = 1 << 2
	CmdFlagReqOne   = 1 << 3
	CmdFlagFastZero = 1 << 4
)

// Structured reply flags and chunk types; error chunks have bit 15 set.
const (
	replyFlagDone = 1 << 0

	replyTypeNone        = 0
	replyTypeOffsetData  = 1
	replyTypeOffsetHole  = 2
	replyTypeBlockStatus = 5
	replyTypeError       = 1<<15 | 1
	replyTypeErrorOffset = 1<<15 | 2
)

// base:allocation status flags.
const (
	StateHole = 1 << 0
	StateZero = 1 << 1
)

// Metadata context names served.
const (
	ContextBaseAllocation = "base:allocation"
	ContextAllocDepth     = "qemu:allocation-depth"
)

// Size limits.
const (
	// MaxPayload is the largest READ or WRITE payload the server accepts
	// and advertises as maximum block size: the spec's interoperable 32 MiB.
	MaxPayload = 32 << 20
	// preferredBlock is advertised as preferred block size.
	preferredBlock = 4096
	// maxString bounds export names, queries and messages (spec: 4096).
	maxString = 4096
	// maxOptionData bounds the option payload the server buffers; longer
	// option data is skipped and answered NBD_REP_ERR_TOO_BIG.
	maxOptionData = 64 << 10
	// maxHandshakeOptions and maxHandshakeBytes bound one handshake (the
	// options and the bytes of option headers and data a client sends,
	// skipped oversized data included), so that a client cannot keep a
	// connection haggling for the whole handshake timeout. Real clients
	// send a handful of options of a few KiB at most: qemu and nbdcopy
	// three or four (STRUCTURED_REPLY, SET_META_CONTEXT, GO), a name of
	// at most 4 KiB, a few queries. nbdinfo --list asks about every
	// export in the same handshake (two options each, measured with
	// libnbd 1.14), so each export adds perExportOptions and
	// perExportBytes to the bounds. 4 MiB still lets a client send an
	// oversized option, learn it was too big and go on.
	maxHandshakeOptions = 1024
	maxHandshakeBytes   = 4 << 20
	perExportOptions    = 4
	perExportBytes      = perExportOptions * (optHeaderLen + 2*maxString)
)

// Fixed sizes of wire structures.
const (
	optHeaderLen        = 16 // magic(8) option(4) length(4)
	optReplyHeaderLen   = 20 // magic(8) option(4) type(4) length(4)
	requestLen          = 28 // magic(4) flags(2) type(2) cookie(8) offset(8) length(4)
	simpleReplyLen      = 16 // magic(4) error(4) cookie(8)
	chunkHeaderLen      = 20 // magic(4) flags(2) type(2) cookie(8) length(4)
	exportNameReplyZero = 124
)

// Errno is an NBD error value as sent in replies. The values are the
// protocol's, which happen to match Linux errno numbers.
type Errno uint32

// Protocol error values.
const (
	EPERM     Errno = 1
	EIO       Errno = 5
	ENOMEM    Errno = 12
	EINVAL    Errno = 22
	ENOSPC    Errno = 28
	EOVERFLOW Errno = 75
	ENOTSUP   Errno = 95
	ESHUTDOWN Errno = 108
)

func (e Errno) Error() string {
	switch e {
	case EPERM:
		return "operation not permitted"
	case EIO:
		return "input/output error"
	case ENOMEM:
		return "cannot allocate memory"
	case EINVAL:
		return "invalid argument"
	case ENOSPC:
		return "no space left on device"
	case EOVERFLOW:
		return "value too large"
	case ENOTSUP:
		return "operation not supported"
	case ESHUTDOWN:
		return "server is shutting down"
	}
	return fmt.Sprintf("nbd error %d", uint32(e))
}

// request is a decoded transmission request header.
type request struct {
	flags  uint16
	typ    uint16
	cookie uint64
	off    uint64
	length uint32
}

// decodeRequest parses a 28-byte request header; ok is false on bad magic.
func decodeRequest(b []byte) (r request, ok bool) {
	_ = b[requestLen-1]
	if binary.BigEndian.Uint32(b[0:]) != magicRequest {
		return r, false
	}
	r.flags = binary.BigEndian.Uint16(b[4:])
	r.typ = binary.BigEndian.Uint16(b[6:])
	r.cookie = binary.BigEndian.Uint64(b[8:])
	r.off = binary.BigEndian.Uint64(b[16:])
	r.length = binary.BigEndian.Uint32(b[24:])
	return r, true
}

func encodeRequest(b []byte, r request) {
	_ = b[requestLen-1]
	binary.BigEndian.PutUint32(b[0:], magicRequest)
	binary.BigEndian.PutUint16(b[4:], r.flags)
	binary.BigEndian.PutUint16(b[6:], r.typ)
	binary.BigEndian.PutUint64(b[8:], r.cookie)
	binary.BigEndian.PutUint64(b[16:], r.off)
	binary.BigEndian.PutUint32(b[24:], r.length)
}

func encodeSimpleReply(b []byte, errno Errno, cookie uint64) {
	_ = b[simpleReplyLen-1]
	binary.BigEndian.PutUint32(b[0:], magicSimpleReply)
	binary.BigEndian.PutUint32(b[4:], uint32(errno))
	binary.BigEndian.PutUint64(b[8:], cookie)
}

func encodeChunkHeader(b []byte, flags, typ uint16, cookie uint64, length uint32) {
	_ = b[chunkHeaderLen-1]
	binary.BigEndian.PutUint32(b[0:], magicStructuredRepl)
	binary.BigEndian.PutUint16(b[4:], flags)
	binary.BigEndian.PutUint16(b[6:], typ)
	binary.BigEndian.PutUint64(b[8:], cookie)
	binary.BigEndian.PutUint32(b[16:], length)
}

func encodeOptReplyHeader(b []byte, opt, typ, length uint32) {
	_ = b[optReplyHeaderLen-1]
	binary.BigEndian.PutUint64(b[0:], magicOptReply)
	binary.BigEndian.PutUint32(b[8:], opt)
	binary.BigEndian.PutUint32(b[12:], typ)
	binary.BigEndian.PutUint32(b[16:], length)
}

// optReader walks option data, remembering the first overrun so that
// parsers can read fields unconditionally and check once at the end.
type optReader struct {
	b   []byte
	bad bool
}

func (r *optReader) u16() uint16 {
	if len(r.b) < 2 {
		r.bad = true
		r.b = nil
		return 0
	}
	v := binary.BigEndian.Uint16(r.b)
	r.b = r.b[2:]
	return v
}

func (r *optReader) u32() uint32 {
	if len(r.b) < 4 {
		r.bad = true
		r.b = nil
		return 0
	}
	v := binary.BigEndian.Uint32(r.b)
	r.b = r.b[4:]
	return v
}

// str reads n bytes as a protocol string, rejecting lengths the spec forbids.
func (r *optReader) str(n uint32) string {
	if uint64(n) > uint64(len(r.b)) || n > maxString {
		r.bad = true
		r.b = nil
		return ""
	}
	s := string(r.b[:n])
	r.b = r.b[n:]
	return s
}
