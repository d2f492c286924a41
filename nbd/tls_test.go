package nbd

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhdkit/vhdkit/internal/testenv"
)

// testTLS makes a self-signed certificate for localhost and returns the
// server and client configurations and a libnbd certificates directory
// (ca-cert.pem) trusting it.
func testTLS(t testing.TB) (srv, cli *tls.Config, dir string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "localhost"},
		DNSNames:              []string{"localhost"},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	srv = &tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}},
		MinVersion:   tls.VersionTLS12,
	}
	cli = &tls.Config{RootCAs: pool, ServerName: "localhost", MinVersion: tls.VersionTLS12}
	dir = t.TempDir()
	pemCert := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	if err := os.WriteFile(filepath.Join(dir, "ca-cert.pem"), pemCert, 0o600); err != nil {
		t.Fatal(err)
	}
	return srv, cli, dir
}

// TestTLSLibnbd connects libnbd (nbdsh) over STARTTLS to a server that
// requires TLS, and checks that a plaintext libnbd client is refused.
func TestTLSLibnbd(t *testing.T) {
	testenv.Tool(t, "nbdsh")
	srvCfg, _, dir := testTLS(t)
	img := newMemImage(1<<20, 512, nil)
	ts := startServer(t, func(s *Server) { s.TLSConfig, s.TLSRequired = srvCfg, true }, Export{Name: "d", Image: img})
	script := `
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_certificates(` + pyStr(dir) + `)
h.set_export_name("d")
h.connect_unix(` + pyStr(ts.sock) + `)
assert h.get_tls_negotiated()
h.pwrite(b"\x5a" * 65536, 4096)
assert h.pread(65536, 4096) == b"\x5a" * 65536
h.flush()
print("ok")
`
	if out := nbdsh(t, script); strings.TrimSpace(out) != "ok" {
		t.Fatalf("nbdsh: %q", out)
	}
	// Without TLS the server refuses to go ahead.
	plain := `
h.set_export_name("d")
try:
    h.connect_unix(` + pyStr(ts.sock) + `)
    print("connected")
except nbd.Error as e:
    print("refused")
`
	if out := nbdsh(t, plain); strings.TrimSpace(out) != "refused" {
		t.Fatalf("plaintext client: %q", out)
	}
	// nbdinfo reaches it through an nbds+unix URI too.
	testenv.Tool(t, "nbdinfo")
	uri := "nbds+unix:///d?socket=" + ts.sock + "&tls-certificates=" + dir
	if out := run(t, 10*time.Second, nil, "nbdinfo", "--json", uri); !strings.Contains(out, `"TLS": true`) {
		t.Fatalf("nbdinfo did not use TLS: %s", out)
	}
}

// pyStr quotes s as a Python string literal.
func pyStr(s string) string {
	return "'" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(s) + "'"
}
