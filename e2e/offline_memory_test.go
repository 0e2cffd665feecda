package e2e

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// TestOfflineMemoryBound splits a capture of 300,000 short connections,
// one after the other, offline: the daemon's memory must stay bounded by
// how many connections are open at once, not grow with the file (the
// reader waits for the writers, fallback names are kept for a while only,
// index files close with their hours). It used to take 1.14 GB.
func TestOfflineMemoryBound(t *testing.T) {
	requireRoot(t)
	wd, _ := os.Getwd()
	bin := filepath.Join(buildBinaries(t, filepath.Dir(wd)), "packet-headers")
	// On a tmpfs: 300,000 files in one directory of a disk's filesystem
	// take minutes to create, and the test is of memory, not of disks.
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=3g", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount a tmpfs: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
	const flows = 300000
	in := filepath.Join(dir, "many.pcap")
	writeShortFlows(t, in, flows)
	cmd := exec.Command(bin, "-read", in, "-datadir", filepath.Join(dir, "out"), "-quiet")
	var output bytes.Buffer
	cmd.Stdout, cmd.Stderr = &output, &output
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// The daemon's own high-water mark (VmHWM starts afresh at exec), read
	// until it exits: the rusage of a child also counts the test's memory,
	// which the child shares between its fork and its exec.
	var peak int64
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	for waiting := true; waiting; {
		if hwm := statusBytes(cmd.Process.Pid, "VmHWM:"); hwm > peak {
			peak = hwm
		}
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("%v\n%s", err, output.String())
			}
			waiting = false
		case <-time.After(20 * time.Millisecond):
		}
	}
	out := output.String()
	files := 0
	filepath.Walk(filepath.Join(dir, "out"), func(p string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() && filepath.Ext(p) == ".gz" {
			files++
		}
		return nil
	})
	t.Logf("%d connections split into %d files with a peak RSS of %d MB: %s", flows, files, peak>>20, out)
	if files != flows {
		t.Errorf("%d files for %d connections", files, flows)
	}
	const bound = 256 << 20
	if peak > bound {
		t.Errorf("peak RSS %d MB, above %d MB", peak>>20, bound>>20)
	}
}

// writeShortFlows writes a pcap of n connections 1 ms apart, each a SYN,
// its SYN-ACK and the client's RST, from distinct client addresses.
func writeShortFlows(t *testing.T, path string, n int) {
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	w := bufio.NewWriterSize(f, 1<<20)
	le := binary.LittleEndian
	hdr := le.AppendUint32(nil, 0xa1b23c4d)
	hdr = le.AppendUint16(hdr, 2)
	hdr = le.AppendUint16(hdr, 4)
	hdr = append(hdr, make([]byte, 8)...)
	hdr = le.AppendUint32(hdr, 256)
	hdr = le.AppendUint32(hdr, 1)
	w.Write(hdr)
	frame := make([]byte, 54)
	frame[12], frame[13] = 0x08, 0x00 // IPv4
	ip := frame[14:34]
	ip[0], ip[8], ip[9] = 0x45, 64, 6
	binary.BigEndian.PutUint16(ip[2:], 40)
	tcp := frame[34:]
	tcp[12] = 5 << 4
	binary.BigEndian.PutUint16(tcp[14:], 64240)
	server := [4]byte{192, 0, 2, 1}
	start := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC).UnixNano()
	rec := make([]byte, 16)
	for i := 0; i < n; i++ {
		client := [4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}
		cport, seq := uint16(1024+i%60000), uint32(i*7919)
		for j, flags := range []byte{0x02, 0x12, 0x04} { // SYN, SYN-ACK, RST
			src, dst, sport, dport := client, server, cport, uint16(443)
			s, ack := seq, uint32(0)
			switch flags {
			case 0x12:
				src, dst, sport, dport = server, client, 443, cport
				s, ack = 1000, seq+1
			case 0x04:
				s = seq + 1
			}
			copy(ip[12:16], src[:])
			copy(ip[16:20], dst[:])
			binary.BigEndian.PutUint16(tcp[0:], sport)
			binary.BigEndian.PutUint16(tcp[2:], dport)
			binary.BigEndian.PutUint32(tcp[4:], s)
			binary.BigEndian.PutUint32(tcp[8:], ack)
			tcp[13] = flags
			ts := start + int64(i)*int64(time.Millisecond) + int64(j)*int64(100*time.Microsecond)
			le.PutUint32(rec[0:], uint32(ts/1e9))
			le.PutUint32(rec[4:], uint32(ts%1e9))
			le.PutUint32(rec[8:], uint32(len(frame)))
			le.PutUint32(rec[12:], uint32(len(frame)))
			w.Write(rec)
			w.Write(frame)
		}
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	f.Close()
}
