package nbd

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/vhdkit/vhdkit/disk"
	"github.com/vhdkit/vhdkit/disk/disktest"
	rawimage "github.com/vhdkit/vhdkit/raw"
	"github.com/vhdkit/vhdkit/vhd"
	"github.com/vhdkit/vhdkit/vhdx"
)

// servedImage is a Client of a Server exporting one image: the suite
// reads and writes the image only through the protocol. Closing it
// disconnects, shuts the server down and closes the image.
type servedImage struct {
	*Client
	srv  *Server
	img  disk.Image
	path string
}

// serveImage exports img on a fresh server and connects a client to it
// over an in-memory connection.
func serveImage(t *testing.T, img disk.Image, path string) *servedImage {
	t.Helper()
	srv := &Server{}
	if err := srv.AddExport(Export{Name: "d", Image: img}); err != nil {
		t.Fatal(err)
	}
	cs, ss := net.Pipe()
	go srv.ServeConn(ss)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := NewClient(ctx, cs, &ClientOptions{Export: "d"})
	if err != nil {
		t.Fatal(err)
	}
	return &servedImage{Client: c, srv: srv, img: img, path: path}
}

func (s *servedImage) Close() error {
	err := s.Client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	return errors.Join(err, s.srv.Shutdown(ctx), s.img.Close())
}

// TestConformance runs the shared disk suite over the client, against the
// server exporting each image kind: raw, VHDX dynamic (512- and 4096-byte
// sectors), fixed and differencing over a parent holding data, and VHD
// dynamic. Persistence goes through a full cycle: the client, server and
// image closed, the file opened again and served anew.
func TestConformance(t *testing.T) {
	const mib = 1 << 20
	open := map[string]func(path string) (disk.Image, error){
		"raw": func(p string) (disk.Image, error) { return rawimage.Open(p, disk.OpenOptions{}) },
		"vhdx": func(p string) (disk.Image, error) {
			return vhdx.Open(p, vhdx.OpenOptions{})
		},
		"vhd": func(p string) (disk.Image, error) { return vhd.Open(p, vhd.OpenOptions{}) },
	}
	for _, kind := range []struct {
		name, format string
		sector       int
		create       func(t *testing.T, dir string, size int64) (disk.Image, string, []byte)
	}{
		{"raw", "raw", 512, func(t *testing.T, dir string, size int64) (disk.Image, string, []byte) {
			p := filepath.Join(dir, "d.img")
			im, err := rawimage.Create(p, size)
			must(t, err)
			return im, p, nil
		}},
		{"vhdx-dynamic-512", "vhdx", 512, vhdxKind(vhdx.CreateOptions{BlockSize: mib})},
		{"vhdx-dynamic-4096", "vhdx", 4096, vhdxKind(vhdx.CreateOptions{BlockSize: mib, LogicalSectorSize: 4096})},
		{"vhdx-fixed", "vhdx", 512, vhdxKind(vhdx.CreateOptions{Type: vhdx.Fixed, BlockSize: mib})},
		{"vhdx-differencing", "vhdx", 512, func(t *testing.T, dir string, size int64) (disk.Image, string, []byte) {
			parent := filepath.Join(dir, "base.vhdx")
			base, err := vhdx.Create(parent, vhdx.CreateOptions{Size: uint64(size), BlockSize: mib})
			must(t, err)
			// Data in every other MiB, ending mid-block.
			initial := make([]byte, size)
			for off := int64(0); off+mib/2 <= size; off += 2 * mib {
				pattern(initial[off:off+mib/2+512], off, 0x3c)
				_, err := base.WriteAt(initial[off:off+mib/2+512], off)
				must(t, err)
			}
			must(t, base.Close())
			p := filepath.Join(dir, "top.avhdx")
			im, err := vhdx.Create(p, vhdx.CreateOptions{Parent: parent, BlockSize: mib})
			must(t, err)
			return im, p, initial
		}},
		{"vhd-dynamic", "vhd", 512, func(t *testing.T, dir string, size int64) (disk.Image, string, []byte) {
			p := filepath.Join(dir, "d.vhd")
			im, err := vhd.Create(p, vhd.CreateOptions{Size: uint64(size)})
			must(t, err)
			return im, p, nil
		}},
	} {
		t.Run(kind.name, func(t *testing.T) {
			t.Parallel()
			h := disktest.Harness{
				Sector: kind.sector,
				// A trim of a differencing image may expose its parent.
				TrimUnspecified: kind.name == "vhdx-differencing",
				// Over NBD the chain's length is not known.
				HoleDepthUnknown: true,
				New: func(t *testing.T, size int64) (disk.Image, []byte) {
					im, path, initial := kind.create(t, t.TempDir(), size)
					return serveImage(t, im, path), initial
				},
				Reopen: func(t *testing.T, img disk.Image) disk.Image {
					s := img.(*servedImage)
					must(t, s.Flush())
					must(t, s.Close())
					im, err := open[kind.format](s.path)
					must(t, err)
					return serveImage(t, im, s.path)
				},
			}
			if kind.format == "vhd" {
				h.Size = 9 << 20 // a VHD's size is whole sectors of its geometry
			}
			disktest.Run(t, h)
		})
	}
}

// vhdxKind creates a VHDX with opts and the suite's size.
func vhdxKind(opts vhdx.CreateOptions) func(t *testing.T, dir string, size int64) (disk.Image, string, []byte) {
	return func(t *testing.T, dir string, size int64) (disk.Image, string, []byte) {
		p := filepath.Join(dir, "d.vhdx")
		opts.Size = uint64(size)
		im, err := vhdx.Create(p, opts)
		must(t, err)
		return im, p, nil
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
