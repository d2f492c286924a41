package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vhdkit/vhdkit/internal/api"
)

// detachKey is Ctrl-] (GS), telnet's and virsh console's escape: typed on
// a terminal it detaches instead of reaching the guest.
const detachKey = 0x1d

func vmConsoleCommand() *command {
	var linger float64
	return clientVerb("vm console", "NAME [--linger SECONDS]", "attach to a running machine's serial console; detach with Ctrl-]",
		`Connects this terminal to the machine's serial console (the unix socket
QEMU serves, runtime.serial in vm show --json; this command must run on
the daemon's host). What is typed goes to the guest, what it prints comes
here; everything it printed is also kept in runtime.console. Ctrl-]
detaches and leaves the machine running. QEMU serves one console client at
a time: a second one waits until the first detaches.

When stdin is not a terminal (a script, a pipe), it is copied to the
console until its end; the guest's output is then shown for --linger
seconds more before the command returns.

Examples:
  vhdkit vm console web
  echo 'uname -a' | vhdkit vm console web --linger 5
`, false, 1,
		func(fs *flag.FlagSet) {
			linger = 1
			fs.Float64Var(&linger, "linger", 1, "with stdin not a terminal: `SECONDS` to show the guest's output after stdin ends")
		},
		func(ctx context.Context, c *cli, cl *api.Client, f *clientFlags, args []string) error {
			if linger < 0 || linger > 3600 {
				return usagef("--linger %v: use 0 to 3600 seconds", linger)
			}
			v, err := cl.VM(ctx, args[0])
			if err != nil {
				return err
			}
			if v.Power != api.PowerRunning && v.Power != api.PowerPaused || v.Runtime == nil || v.Runtime.Serial == "" {
				return fmt.Errorf("machine %s is %s: its console exists only while it runs (vhdkit vm start %s)", v.Name, v.Power, v.Name)
			}
			conn, err := net.Dial("unix", v.Runtime.Serial)
			if err != nil {
				return fmt.Errorf("console of machine %s: %w (the console is on the daemon's host)", v.Name, err)
			}
			defer conn.Close()
			return attachConsole(c, v.Name, conn, os.Stdin, time.Duration(linger*float64(time.Second)))
		})
}

// attachConsole copies in to conn and conn to c.stdout. On a terminal,
// in is put in raw mode (keys reach the guest as typed, Ctrl-C included)
// and Ctrl-] detaches; otherwise in is copied until its end and the
// guest's output shown for linger more.
func attachConsole(c *cli, name string, conn net.Conn, in *os.File, linger time.Duration) error {
	fd := int(in.Fd())
	saved, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	terminal := err == nil
	if terminal {
		raw := *saved
		// cfmakeraw: no line editing, echo or signals; bytes as typed.
		raw.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
		raw.Oflag &^= unix.OPOST
		raw.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
		raw.Cflag &^= unix.CSIZE | unix.PARENB
		raw.Cflag |= unix.CS8
		raw.Cc[unix.VMIN], raw.Cc[unix.VTIME] = 1, 0
		if err := unix.IoctlSetTermios(fd, unix.TCSETS, &raw); err != nil {
			return fmt.Errorf("raw mode for the console: %w", err)
		}
		defer unix.IoctlSetTermios(fd, unix.TCSETS, saved)
		fmt.Fprintf(c.stderr, "attached to machine %s's console; detach with Ctrl-]\r\n", name)
	}

	output := make(chan error, 1)
	go func() {
		_, err := io.Copy(c.stdout, conn)
		output <- err
	}()
	input := make(chan error, 1)
	go func() { input <- copyInput(conn, in, terminal) }()

	select {
	case err := <-output:
		// QEMU closed the console: the machine ended.
		if err == nil || errors.Is(err, net.ErrClosed) {
			return fmt.Errorf("machine %s's console closed: the machine no longer runs", name)
		}
		return fmt.Errorf("machine %s's console: %w", name, err)
	case err := <-input:
		if err != nil {
			return err
		}
		if terminal {
			fmt.Fprintf(c.stderr, "\r\ndetached from machine %s's console\r\n", name)
			return nil
		}
		select {
		case <-time.After(linger):
		case <-output:
		}
		return nil
	}
}

// copyInput copies in to conn until in ends (nil) or, on a terminal,
// until the detach key (nil; what was typed before it is sent).
func copyInput(conn net.Conn, in io.Reader, terminal bool) error {
	buf := make([]byte, 4096)
	for {
		n, err := in.Read(buf)
		chunk, detach := buf[:n], false
		if terminal {
			if i := bytes.IndexByte(chunk, detachKey); i >= 0 {
				chunk, detach = chunk[:i], true
			}
		}
		if len(chunk) > 0 {
			if _, werr := conn.Write(chunk); werr != nil {
				return fmt.Errorf("writing to the console: %w", werr)
			}
		}
		if detach || err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("reading stdin: %w", err)
		}
	}
}
