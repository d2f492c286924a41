package main

import (
	"fmt"
	"io"
	"os"
	"strings"
	"time"
)

// progressBar reports how much of a long operation is done on stderr. On a
// terminal it redraws one line; elsewhere it prints a line every 10%.
type progressBar struct {
	w        io.Writer
	terminal bool
	total    int64
	done     int64
	start    time.Time
	last     time.Time // last redraw, on a terminal
	lastTens int64     // last 10% step printed, elsewhere
}

func newProgressBar(w io.Writer, total int64, terminal bool) *progressBar {
	now := time.Now()
	return &progressBar{w: w, terminal: terminal, total: total, start: now, lastTens: -1}
}

// isTerminal reports whether w is a character device such as a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

func (p *progressBar) add(n int64) {
	p.done = min(p.total, p.done+n)
	p.draw(false)
}

// finish draws the final state and ends the line.
func (p *progressBar) finish() {
	p.done = p.total
	p.draw(true)
	if p.terminal {
		fmt.Fprintln(p.w)
	}
}

// abort ends a terminal's progress line so that an error starts on its own.
func (p *progressBar) abort() {
	if p.terminal {
		fmt.Fprintln(p.w)
	}
}

func (p *progressBar) draw(final bool) {
	pct := int64(100)
	if p.total > 0 {
		pct = p.done * 100 / p.total
	}
	now := time.Now()
	if p.terminal {
		if !final && now.Sub(p.last) < 100*time.Millisecond {
			return
		}
		p.last = now
		const width = 30
		filled := int(pct * width / 100)
		rate := ""
		if secs := now.Sub(p.start).Seconds(); secs > 0.2 && p.done > 0 {
			bps := float64(p.done) / secs
			rate = fmt.Sprintf("  %s/s", humanBytes(int64(bps)))
			if left := p.total - p.done; left > 0 {
				rate += fmt.Sprintf("  %s left", (time.Duration(float64(left)/bps) * time.Second).Round(time.Second))
			}
		}
		fmt.Fprintf(p.w, "\r[%s%s] %3d%%  %s of %s%s\x1b[K", strings.Repeat("#", filled),
			strings.Repeat(" ", width-filled), pct, humanBytes(p.done), humanBytes(p.total), rate)
		return
	}
	if tens := pct / 10; tens > p.lastTens {
		p.lastTens = tens
		fmt.Fprintf(p.w, "progress: %3d%%  %s of %s\n", tens*10, humanBytes(p.done), humanBytes(p.total))
	}
}

// humanBytes renders n with one decimal in the largest binary unit below it.
func humanBytes(n int64) string {
	units := []string{"bytes", "KiB", "MiB", "GiB", "TiB", "PiB"}
	v, i := float64(n), 0
	for v >= 1024 && i < len(units)-1 {
		v /= 1024
		i++
	}
	if i == 0 {
		return fmt.Sprintf("%d bytes", n)
	}
	return fmt.Sprintf("%.1f %s", v, units[i])
}
