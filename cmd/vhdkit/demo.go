package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

func demoCommand() *command {
	return &command{
		name:     "demo",
		synopsis: "[DIR]",
		summary:  "walk through creating, filling, inspecting, chaining and converting a disk",
		help: `Runs a short walkthrough and prints each step with the equivalent command:
create a dynamic VHDX, write a pattern into it, show its info and allocation
map, create a differencing child, write into the child, show the chain,
convert the child (flattened) to a raw image and verify its bytes, check the
images. It works in a fresh temporary directory, removed at the end, or in
DIR, where the files are kept (they must not exist yet).

Examples:
  vhdkit demo
  vhdkit demo ./demo-files
`,
		setup: func(fs *flag.FlagSet) func(context.Context, *cli, []string) error {
			return func(ctx context.Context, c *cli, args []string) error {
				if len(args) > 1 {
					return usagef("want at most one DIR, got %d arguments", len(args))
				}
				dir := ""
				if len(args) == 1 {
					dir = args[0]
				}
				return c.demo(ctx, dir)
			}
		},
	}
}

// The demo disk: 64 MiB in 1 MiB blocks, so that its map shows a few
// allocated blocks among holes.
const (
	demoSize      = 64 << 20
	demoBlockSize = 1 << 20
)

// demoWrite is one write of the demo, done both to an image and to the
// in-memory model the result is verified against.
type demoWrite struct {
	off  int64
	data []byte
}

func (c *cli) demo(ctx context.Context, dir string) (err error) {
	if dir == "" {
		dir, err = os.MkdirTemp("", "vhdkit-demo-")
		if err != nil {
			return err
		}
		defer func() {
			if rerr := os.RemoveAll(dir); err == nil && rerr != nil {
				err = rerr
			}
			if err == nil {
				fmt.Fprintf(c.stdout, "\nRemoved %s. Run \"vhdkit demo DIR\" to keep the files.\n", dir)
			}
		}()
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	base := filepath.Join(dir, "base.vhdx")
	child := filepath.Join(dir, "child.avhdx")
	flat := filepath.Join(dir, "flat.img")
	model := make([]byte, demoSize)

	step := 0
	say := func(title string) {
		step++
		if step > 1 {
			fmt.Fprintln(c.stdout)
		}
		fmt.Fprintf(c.stdout, "== %d. %s\n", step, title)
	}
	// vhdkit runs one verb in-process, echoing it like a shell would.
	vhdkit := func(args ...string) error {
		fmt.Fprintf(c.stdout, "$ vhdkit %s\n", strings.Join(args, " "))
		var stderr bytes.Buffer
		if code := run(ctx, args, c.stdout, &stderr); code != 0 {
			msg := strings.TrimSpace(stderr.String())
			return fmt.Errorf("step %d failed: %s", step, strings.TrimPrefix(msg, "vhdkit: "))
		}
		return nil
	}
	write := func(path string, writes []demoWrite) error {
		im, err := openImage(path, false)
		if err != nil {
			return err
		}
		for _, w := range writes {
			fmt.Fprintf(c.stdout, "  write %s at offset %d (%s)\n", formatSize(int64(len(w.data))), w.off, filepath.Base(path))
			if _, err := im.WriteAt(w.data, w.off); err != nil {
				im.Close()
				return err
			}
			copy(model[w.off:], w.data)
		}
		if err := im.Flush(); err != nil {
			im.Close()
			return err
		}
		return im.Close()
	}

	fmt.Fprintf(c.stdout, "vhdkit demo in %s\n\n", dir)
	say("Create a dynamic 64 MiB VHDX with 1 MiB blocks")
	if err := vhdkit("create", "--size", "64M", "--block-size", "1M", base); err != nil {
		return err
	}
	say("Write a pattern into it (through the vhdx package)")
	if err := write(base, []demoWrite{
		{0, demoPattern(3<<20, 1)},            // blocks 0-2
		{40<<20 + 4096, demoPattern(8192, 2)}, // part of block 40
	}); err != nil {
		return err
	}
	say("Inspect it: only the written blocks are allocated")
	if err := vhdkit("info", base); err != nil {
		return err
	}
	if err := vhdkit("map", base); err != nil {
		return err
	}
	say("Create a differencing child: new writes go to the child, the base stays as it is")
	if err := vhdkit("create", "--parent", base, child); err != nil {
		return err
	}
	if err := write(child, []demoWrite{
		{1<<20 + 512, demoPattern(64<<10, 3)}, // over the base's data
		{60 << 20, demoPattern(4096, 4)},      // where the base has a hole
	}); err != nil {
		return err
	}
	say("Show the chain and where each range comes from (depth 0: child, 1: base)")
	if err := vhdkit("info", child); err != nil {
		return err
	}
	if err := vhdkit("map", child); err != nil {
		return err
	}
	say("Convert the child, flattened through its chain, to a raw image")
	if err := vhdkit("convert", child, flat); err != nil {
		return err
	}
	got, err := os.ReadFile(flat)
	if err != nil {
		return err
	}
	if !bytes.Equal(got, model) {
		return fmt.Errorf("%s does not hold the bytes written (first difference at offset %d)", flat, firstDifference(got, model))
	}
	fmt.Fprintf(c.stdout, "  verified: %s holds exactly the %s written through the chain\n", filepath.Base(flat), formatSize(demoSize))
	say("Check both images")
	if err := vhdkit("check", base); err != nil {
		return err
	}
	if err := vhdkit("check", child); err != nil {
		return err
	}
	fmt.Fprintf(c.stdout, "\nDemo finished: every step succeeded.\n")
	return nil
}

// demoPattern returns n recognisable bytes: seed, then a counter, per
// 16-byte line.
func demoPattern(n int, seed byte) []byte {
	p := make([]byte, n)
	for i := 0; i < n; i += 16 {
		line := fmt.Sprintf("vhdkit%02x %07x", seed, i/16)
		copy(p[i:], line)
	}
	return p
}

func firstDifference(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}
