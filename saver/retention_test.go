package saver

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/m-lab/packet-headers/packet"
	"github.com/m-lab/packet-headers/record"
)

// saveAt writes one flow of n records of 200 bytes, its first at first,
// and waits for it.
func saveAt(s *Saver, uuid string, first time.Time, n int) {
	var b record.Buffer
	hdr := make([]byte, 200)
	for i := 0; i < n; i++ {
		b.Append(first, 1514, hdr)
	}
	s.Start(uuid, packet.LinkTypeEthernet, first).Push(&b, true)
	s.Wait()
}

// dayDirs returns the day directories below data that hold something.
func dayDirs(t *testing.T, data string) map[string]int {
	t.Helper()
	out := map[string]int{}
	days, _ := filepath.Glob(filepath.Join(data, "*", "*", "*"))
	for _, d := range days {
		if st, err := os.Lstat(d); err != nil || !st.IsDir() {
			continue
		}
		names, _ := os.ReadDir(d)
		rel, _ := filepath.Rel(data, d)
		out[rel] = len(names)
	}
	return out
}

// TestRetention fills a small filesystem (a 4 MiB tmpfs) with a flow of
// about 200 KB every four hours for four days, the retainer run after
// each as -retention.minfree=1MB asks: every flow is saved (none refused
// for low space, none failed), the oldest days are deleted whole, today's
// is kept, and what is not a day directory (a link named like one, a
// file) is left alone, the link's target untouched.
func TestRetention(t *testing.T) {
	dir := tmpfs(t, "4m")
	victim := t.TempDir()
	os.WriteFile(filepath.Join(victim, "keep"), []byte("x"), 0o600)
	data := filepath.Join(dir, "data")
	s, err := New(Options{Dir: data, MinFreeBytes: 512 << 10})
	if err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(filepath.Join(data, "2026", "11"), 0o750)
	os.Symlink(victim, filepath.Join(data, "2026", "11", "01"))
	os.WriteFile(filepath.Join(data, "README"), []byte("not a day"), 0o640)
	r := s.NewRetainer(Retention{MinFreeBytes: 1 << 20})
	start := time.Date(2026, 11, 20, 1, 0, 0, 0, time.UTC)
	const flows = 24
	for i := 0; i < flows; i++ {
		at := start.Add(time.Duration(i) * 4 * time.Hour)
		if err := s.PrepareDays(at); err != nil {
			t.Fatal(err)
		}
		saveAt(s, "flow"+strconv.Itoa(i), at, 1000)
		if err := r.Run(context.Background(), at); err != nil {
			t.Fatalf("Run at %v: %v", at, err)
		}
	}
	files, _, failed := s.Written()
	if files != flows || failed != 0 || s.Counts().Flows.Get("low_space") != 0 {
		t.Errorf("%d files written, %d failed, %d refused for low space; want %d, 0, 0", files, failed, s.Counts().Flows.Get("low_space"), flows)
	}
	days := dayDirs(t, data)
	if days["2026/11/23"] != 6 {
		t.Errorf("today's directory holds %d files, want its 6 (days left: %v)", days["2026/11/23"], days)
	}
	if _, ok := days["2026/11/24"]; !ok {
		t.Errorf("the day made ahead was deleted (days left: %v)", days)
	}
	if _, ok := days["2026/11/20"]; ok || r.Counts.Days.Load() < 1 || r.Counts.Files.Load() < 6 {
		t.Errorf("the oldest day was not deleted: %v; %d days, %d files deleted", days, r.Counts.Days.Load(), r.Counts.Files.Load())
	}
	for d, n := range days {
		if d < "2026/11/23" && n != 6 {
			t.Errorf("day %s is kept in part: %d files", d, n)
		}
	}
	if oldest := time.Unix(r.Counts.Oldest.Load(), 0).UTC().Format("2006/01/02"); days[oldest] == 0 && oldest != "2026/11/23" {
		t.Errorf("the oldest day kept is said to be %s, days left: %v", oldest, days)
	}
	if _, err := os.Lstat(filepath.Join(data, "2026", "11", "01")); err != nil {
		t.Error("a link named like a day was deleted")
	}
	if _, err := os.Stat(filepath.Join(victim, "keep")); err != nil {
		t.Error("the link's target was touched")
	}
	if _, err := os.Stat(filepath.Join(data, "README")); err != nil {
		t.Error("a file that is not a day was deleted")
	}
}

// TestRetentionAgeAndBudget: -retention.maxdays keeps today and the days
// before it that it names; -retention.maxsize deletes the oldest days
// until the rest fit; neither deletes today's or the day made ahead.
func TestRetentionAgeAndBudget(t *testing.T) {
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	fill := func(t *testing.T) (*Saver, string) {
		data := filepath.Join(t.TempDir(), "data")
		s, err := New(Options{Dir: data})
		if err != nil {
			t.Fatal(err)
		}
		for d := 20; d <= 25; d++ {
			saveAt(s, "day"+strconv.Itoa(d), time.Date(2026, 11, d, 6, 0, 0, 0, time.UTC), 500)
		}
		s.PrepareDays(now)
		return s, data
	}
	for _, tt := range []struct {
		name string
		r    Retention
		kept []string
	}{
		{"maxdays 2", Retention{MaxDays: 2}, []string{"2026/11/23", "2026/11/24", "2026/11/25", "2026/11/26"}},
		{"maxdays 1000", Retention{MaxDays: 1000}, []string{"2026/11/20", "2026/11/21", "2026/11/22", "2026/11/23", "2026/11/24", "2026/11/25", "2026/11/26"}},
		{"maxsize of three days", Retention{MaxBytes: 3 * 110 << 10}, []string{"2026/11/23", "2026/11/24", "2026/11/25", "2026/11/26"}},
		{"maxsize 1", Retention{MaxBytes: 1}, []string{"2026/11/25", "2026/11/26"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s, data := fill(t)
			r := s.NewRetainer(tt.r)
			if err := r.Run(context.Background(), now); err != nil {
				t.Fatal(err)
			}
			days := dayDirs(t, data)
			if len(days) != len(tt.kept) {
				t.Errorf("days kept %v, want %v", days, tt.kept)
			}
			for _, d := range tt.kept {
				if _, ok := days[d]; !ok {
					t.Errorf("day %s was deleted; kept %v", d, days)
				}
			}
			if want := time.Date(2026, 11, 25, 0, 0, 0, 0, time.UTC).AddDate(0, 0, -(len(tt.kept) - 2)); r.Counts.Oldest.Load() != want.Unix() {
				t.Errorf("oldest day kept %v, want %v", time.Unix(r.Counts.Oldest.Load(), 0).UTC(), want)
			}
		})
	}
}
