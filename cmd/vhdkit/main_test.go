package main

import (
	"bytes"
	"compress/bzip2"
	"compress/gzip"
	"context"
	"crypto/md5"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/rogpeppe/go-internal/testscript"

	"github.com/vhdkit/vhdkit/disk"
)

// TestMain makes the test binary double as the vhdkit command for the
// scripts in testdata/script.
func TestMain(m *testing.M) {
	testscript.Main(m, map[string]func(){
		"vhdkit": func() { os.Exit(run(context.Background(), os.Args[1:], os.Stdout, os.Stderr)) },
	})
}

func TestScript(t *testing.T) {
	testscript.Run(t, testscript.Params{
		Dir:                 "testdata/script",
		RequireExplicitExec: true,
		Condition:           scriptCondition,
		Cmds: map[string]func(ts *testscript.TestScript, neg bool, args []string){
			"fill":        cmdFill,
			"stderrlines": cmdStderrLines,
			"exitcode":    cmdExitCode,
			"unpack":      cmdUnpack,
			"md5":         cmdMD5,
			"cmpbin":      cmdCmpBin,
		},
	})
}

// samplesDir is the team's folder of real-world images, beside the repo.
var samplesDir = filepath.Join("..", "..", "..", "shared", "samples")

// scriptCondition implements the script conditions
//
//	[tool:NAME]  the program NAME is installed
//	[samples]    the real-world sample images (../shared/samples) are there
//
// In CI (CI=true) a missing tool or sample folder is an error, so that
// scripts written "[!tool:qemu-img] skip" never skip there.
func scriptCondition(cond string) (bool, error) {
	var err error
	switch name, isTool := strings.CutPrefix(cond, "tool:"); {
	case isTool:
		_, err = exec.LookPath(name)
	case cond == "samples":
		_, err = os.Stat(samplesDir)
	default:
		return false, fmt.Errorf("unknown condition %q", cond)
	}
	if err != nil {
		if os.Getenv("CI") == "true" {
			return false, fmt.Errorf("[%s] is required in CI: %v", cond, err)
		}
		return false, nil
	}
	return true, nil
}

// cmdUnpack decompresses a sample image (.gz or .bz2) into the script's
// directory.
//
//	unpack SAMPLE DST
func cmdUnpack(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 2 {
		ts.Fatalf("usage: unpack SAMPLE DST")
	}
	in, err := os.Open(filepath.Join(samplesDir, args[0]))
	ts.Check(err)
	defer in.Close()
	var r io.Reader
	switch filepath.Ext(args[0]) {
	case ".gz":
		zr, err := gzip.NewReader(in)
		ts.Check(err)
		r = zr
	case ".bz2":
		r = bzip2.NewReader(in)
	default:
		ts.Fatalf("unpack: %s is neither .gz nor .bz2", args[0])
	}
	out, err := os.Create(ts.MkAbs(args[1]))
	ts.Check(err)
	_, err = io.Copy(out, r)
	ts.Check(err)
	ts.Check(out.Close())
}

// cmdCmpBin compares two binary files and reports the first difference
// (cmp would print a diff of binary data).
//
//	cmpbin FILE1 FILE2
func cmdCmpBin(ts *testscript.TestScript, neg bool, args []string) {
	if len(args) != 2 {
		ts.Fatalf("usage: cmpbin FILE1 FILE2")
	}
	a, err := os.ReadFile(ts.MkAbs(args[0]))
	ts.Check(err)
	b, err := os.ReadFile(ts.MkAbs(args[1]))
	ts.Check(err)
	same := bytes.Equal(a, b)
	switch {
	case same && neg:
		ts.Fatalf("%s and %s are the same", args[0], args[1])
	case !same && !neg:
		ts.Fatalf("%s (%d bytes) and %s (%d bytes) differ from offset %d",
			args[0], len(a), args[1], len(b), firstDifference(a, b))
	}
}

// cmdMD5 checks the MD5 sum of a file.
//
//	md5 FILE HEX
func cmdMD5(ts *testscript.TestScript, neg bool, args []string) {
	if len(args) != 2 {
		ts.Fatalf("usage: md5 FILE HEX")
	}
	f, err := os.Open(ts.MkAbs(args[0]))
	ts.Check(err)
	defer f.Close()
	h := md5.New()
	_, err = io.Copy(h, f)
	ts.Check(err)
	got := hex.EncodeToString(h.Sum(nil))
	if (got == args[1]) == neg {
		ts.Fatalf("md5 of %s is %s, want %s%s", args[0], got, map[bool]string{true: "not ", false: ""}[neg], args[1])
	}
}

// cmdFill writes LENGTH deterministic bytes at OFFSET into FILE: random
// bytes from SEED, or zeros for SEED "zero". A FILE named raw (or of no
// known extension) is written as a plain file, created or grown as needed,
// whatever it holds (so a script can damage an image copied to a .bin); a
// .vhdx or .vhd through its format.
//
//	fill FILE OFFSET LENGTH SEED
func cmdFill(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 4 {
		ts.Fatalf("usage: fill FILE OFFSET LENGTH SEED")
	}
	path := ts.MkAbs(args[0])
	off, err := parseSize(args[1])
	ts.Check(err)
	n, err := parseSize(args[2])
	ts.Check(err)
	data := make([]byte, n)
	if args[3] != "zero" {
		seed, err := strconv.ParseUint(args[3], 10, 64)
		ts.Check(err)
		r := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8), byte(seed >> 16), byte(seed >> 24)})
		r.Read(data)
	}
	if f, ok := disk.FormatForPath(path); ok && f.Name != "raw" {
		im, err := openImage(path, false)
		ts.Check(err)
		_, err = im.WriteAt(data, off)
		ts.Check(err)
		ts.Check(im.Flush())
		ts.Check(im.Close())
		return
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	ts.Check(err)
	_, err = f.WriteAt(data, off)
	ts.Check(err)
	ts.Check(f.Close())
}

// cmdStderrLines checks that the last command wrote exactly N lines to
// stderr: a failure is reported in one line, never a panic trace.
//
//	stderrlines N
func cmdStderrLines(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 1 {
		ts.Fatalf("usage: stderrlines N")
	}
	want, err := strconv.Atoi(args[0])
	ts.Check(err)
	text := ts.ReadFile("stderr")
	got := strings.Count(text, "\n")
	if text != "" && !strings.HasSuffix(text, "\n") {
		got++
	}
	if got != want {
		ts.Fatalf("stderr has %d lines, want %d:\n%s", got, want, text)
	}
}

// cmdExitCode runs PROGRAM and checks its exit status; stdout and stderr
// are then available to the stdout and stderr commands as after exec.
//
//	exitcode N PROGRAM [ARGS...]
func cmdExitCode(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) < 2 {
		ts.Fatalf("usage: exitcode N PROGRAM [ARGS...]")
	}
	want, err := strconv.Atoi(args[0])
	ts.Check(err)
	got := 0
	if err := ts.Exec(args[1], args[2:]...); err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			ts.Fatalf("%s: %v", args[1], err)
		}
		got = ee.ExitCode()
	}
	if got != want {
		ts.Fatalf("%s exited with status %d, want %d", args[1], got, want)
	}
}

// TestRunInProcess runs a few commands through run directly, as main does.
func TestRunInProcess(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "a.img")
	var stdout, stderr strings.Builder
	if code := run(context.Background(), []string{"create", img, "--size", "1M"}, &stdout, &stderr); code != 0 {
		t.Fatalf("create: exit %d, stderr %q", code, stderr.String())
	}
	if fi, err := os.Stat(img); err != nil || fi.Size() != 1<<20 {
		t.Fatalf("created file: %v, %v", fi, err)
	}
	for _, tc := range []struct {
		args []string
		code int
	}{
		{nil, 2},
		{[]string{"nosuchverb"}, 2},
		{[]string{"create", img, "--size", "1M"}, 1},             // exists
		{[]string{"create", filepath.Join(dir, "b.img")}, 2},     // no size
		{[]string{"info", "--json", img, "extra"}, 2},            // too many args
		{[]string{"info", filepath.Join(dir, "missing.img")}, 1}, // no such file
	} {
		stderr.Reset()
		code := run(context.Background(), tc.args, &stdout, &stderr)
		if code != tc.code {
			t.Errorf("run %q: exit %d, want %d", tc.args, code, tc.code)
		}
		if lines := strings.Count(stderr.String(), "\n"); lines != 1 || !strings.HasPrefix(stderr.String(), "vhdkit: ") {
			t.Errorf("run %q: stderr %q, want one line starting with \"vhdkit: \"", tc.args, stderr.String())
		}
	}
}

// TestRunPanic checks that a panic in a verb ends in one line on stderr
// and exit status 1, not a trace.
func TestRunPanic(t *testing.T) {
	boom := &command{
		name: "boom",
		setup: func(fs *flag.FlagSet) func(context.Context, *cli, []string) error {
			return func(context.Context, *cli, []string) error {
				var m map[string]int
				m["x"]++ // nil map: panics
				return nil
			}
		},
	}
	var stdout, stderr strings.Builder
	code := commandSet{boom}.run(context.Background(), []string{"boom"}, &stdout, &stderr)
	want := "vhdkit: boom: internal error: assignment to entry in nil map\n"
	if code != 1 || stderr.String() != want {
		t.Errorf("exit %d, stderr %q; want 1, %q", code, stderr.String(), want)
	}
}

// TestRunCanceled checks that an interrupted command says so in one line.
func TestRunCanceled(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.img")
	if err := os.WriteFile(src, []byte(strings.Repeat("x", 1<<20)), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var stdout, stderr strings.Builder
	dst := filepath.Join(dir, "dst.img")
	code := run(ctx, []string{"convert", src, dst}, &stdout, &stderr)
	if code != 1 || stderr.String() != "vhdkit: convert: interrupted\n" {
		t.Errorf("exit %d, stderr %q; want 1, %q", code, stderr.String(), "vhdkit: convert: interrupted\n")
	}
	if _, err := os.Stat(dst); !os.IsNotExist(err) {
		t.Errorf("partial %s left behind: %v", dst, err)
	}
}
