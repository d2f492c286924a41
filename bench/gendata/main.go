// Command gendata writes a deterministic raw disk image that looks like a
// used disk: runs of random data (compressed or encrypted files), long
// zero runs (free space; half of them holes, half written zeros), repeated
// patterns (text, tables, sparse metadata) and blocks where data and zero
// sectors alternate. The same size and seed always give the same bytes.
//
//	go run ./bench/gendata [-size 1G] [-seed 1] FILE
package main

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
)

func main() {
	sizeFlag := flag.String("size", "1G", "image size: bytes, or with K, M or G")
	seed := flag.Uint64("seed", 1, "random seed")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: gendata [-size SIZE] [-seed N] FILE")
		os.Exit(2)
	}
	size, err := parseSize(*sizeFlag)
	if err == nil {
		err = generate(flag.Arg(0), size, *seed)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "gendata:", err)
		os.Exit(1)
	}
}

func parseSize(s string) (int64, error) {
	shift := 0
	switch {
	case strings.HasSuffix(s, "K"):
		shift = 10
	case strings.HasSuffix(s, "M"):
		shift = 20
	case strings.HasSuffix(s, "G"):
		shift = 30
	}
	n, err := strconv.ParseInt(strings.TrimRight(s, "KMG"), 10, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("invalid size %q", s)
	}
	return n << shift, nil
}

const sector = 4096

func generate(path string, size int64, seed uint64) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	r := rand.New(rand.NewPCG(seed, 0x76686b6974))
	var key [32]byte
	for i := range key {
		key[i] = byte(r.Uint32())
	}
	random := rand.NewChaCha8(key)
	buf := make([]byte, 4<<20)
	// between returns a multiple of 4 KiB in [lo, hi).
	between := func(lo, hi int64) int64 { return (lo + r.Int64N(hi-lo)) &^ (sector - 1) }

	const (
		randomRun = iota
		zeroRun
		hole
		patternRun
		mixedRun
	)
	names := []string{"random", "written zeros", "holes", "patterns", "mixed 4 KiB data/zero"}
	var total [5]int64
	for off := int64(0); off < size; {
		var kind int
		var n int64
		switch k := r.IntN(100); {
		case k < 35:
			kind, n = randomRun, between(256<<10, 32<<20)
		case k < 50:
			kind, n = zeroRun, between(1<<20, 32<<20)
		case k < 65:
			kind, n = hole, between(1<<20, 32<<20)
		case k < 85:
			kind, n = patternRun, between(64<<10, 8<<20)
		default:
			kind, n = mixedRun, between(1<<20, 8<<20)
		}
		n = min(max(n, sector), size-off)
		total[kind] += n
		if kind == hole {
			off += n // left to the final truncate
			continue
		}
		for done := int64(0); done < n; {
			p := buf[:min(int64(len(buf)), n-done)]
			switch kind {
			case randomRun:
				random.Read(p)
			case zeroRun:
				clear(p)
			case patternRun:
				fillPattern(p, off+done)
			case mixedRun:
				for i := 0; i < len(p); i += sector {
					s := p[i:min(len(p), i+sector)]
					if r.IntN(2) == 0 {
						clear(s)
					} else {
						random.Read(s)
					}
				}
			}
			if _, err := f.WriteAt(p, off+done); err != nil {
				f.Close()
				return err
			}
			done += int64(len(p))
		}
		off += n
	}
	var parts []string
	for i, n := range total {
		parts = append(parts, fmt.Sprintf("%s %d MiB", names[i], n>>20))
	}
	fmt.Fprintf(os.Stderr, "%s: %s\n", path, strings.Join(parts, ", "))
	if err := f.Truncate(size); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// fillPattern writes text lines that repeat with a changing counter, as
// logs and tables do.
func fillPattern(p []byte, off int64) {
	for i := 0; i < len(p); i += 64 {
		line := fmt.Sprintf("%016x INFO vhdkit bench pattern line, nothing to see here\n", (off+int64(i))/64)
		copy(p[i:], line[:64])
	}
}
