package keyfile

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestRead: a key file is read whole; a FIFO (with no writer), a
// directory or a device is refused at once rather than waited on; a file
// others can read, or longer than asked, is refused with its reason.
func TestRead(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		os.WriteFile(p, []byte(content), mode)
		os.Chmod(p, mode)
		return p
	}
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	if b, err := Read(write("key", "secret", 0o600), 16); err != nil || string(b) != "secret" {
		t.Errorf("Read = %q, %v", b, err)
	}
	for _, tt := range []struct {
		name, path string
		want       error
		says       string
	}{
		{"fifo", fifo, nil, "not a regular file"},
		{"directory", dir, nil, "not a regular file"},
		{"device", "/dev/zero", nil, "not a regular file"},
		{"readable by others", write("open", "secret", 0o644), ErrExposed, "chmod o-r"},
		{"too long", write("long", strings.Repeat("k", 17), 0o600), ErrTooLong, "more than 16 bytes"},
		{"missing", filepath.Join(dir, "none"), os.ErrNotExist, "none"},
	} {
		done := make(chan error, 1)
		go func() { _, err := Read(tt.path, 16); done <- err }()
		select {
		case err := <-done:
			if err == nil || tt.want != nil && !errors.Is(err, tt.want) || !strings.Contains(err.Error(), tt.says) {
				t.Errorf("%s: %v, want %v saying %q", tt.name, err, tt.want, tt.says)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: Read is still waiting after 5 s", tt.name)
		}
	}
}
