/* Tests of the public headers (include/): every public function is documented where it is
 * declared, and cport.h includes every header. */
/* test-backends: none */
#include "harness.h"

#include <dirent.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { MAX_LINES = 4096, LINE_MAX_LEN = 512 };

static char lines[MAX_LINES][LINE_MAX_LEN];

static int read_lines(const char *path)
{
    FILE *f = fopen(path, "r");
    CHECK(f != NULL);
    int n = 0;
    while (n < MAX_LINES && fgets(lines[n], LINE_MAX_LEN, f)) {
        lines[n][strcspn(lines[n], "\n")] = 0;
        n++;
    }
    CHECK(feof(f)); /* (the file fits) */
    fclose(f);
    return n;
}

static bool starts_with(const char *s, const char *prefix)
{
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

/* A line that continues the declaration above it (its parameters, indented). */
static bool continues_declaration(const char *l)
{
    const char *t = l + strspn(l, " ");
    return t != l && *t && !starts_with(t, "/*") && !starts_with(t, "*");
}

/* Declarations (CP_EXTERN ...) in the header without a comment right above them, or above
 * the group of declarations they belong to; each is printed. */
static int undocumented_in(const char *path, int *declared)
{
    int n = read_lines(path), missing = 0;
    for (int i = 0; i < n; i++) {
        if (!starts_with(lines[i], "CP_EXTERN"))
            continue;
        (*declared)++;
        int j = i - 1;
        while (j >= 0 && (starts_with(lines[j], "CP_EXTERN") || continues_declaration(lines[j])))
            j--;
        size_t len = j >= 0 ? strlen(lines[j]) : 0;
        if (len < 2 || strcmp(lines[j] + len - 2, "*/") != 0) {
            fprintf(stderr, "%s:%d: undocumented: %s\n", path, i + 1, lines[i]);
            missing++;
        }
    }
    return missing;
}

TEST(every_public_function_is_documented)
{
    const char *root = cpt_source_root();
    CHECK(root != NULL);
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s/include/cport", root);
    DIR *d = opendir(dir);
    CHECK(d != NULL);
    int headers = 0, declared = 0, missing = 0;
    for (struct dirent *e; (e = readdir(d)) != NULL;) {
        size_t len = strlen(e->d_name);
        if (len < 3 || strcmp(e->d_name + len - 2, ".h") != 0)
            continue;
        char path[PATH_MAX + 256];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        headers++;
        missing += undocumented_in(path, &declared);
    }
    closedir(d);
    fprintf(stderr, "%d headers, %d public functions, %d undocumented\n", headers, declared,
            missing);
    CHECK(headers >= 7 && declared >= 80);
    CHECK_EQ(missing, 0);
}

/* cport.h, the one header a program needs, includes every public header. */
TEST(cport_h_includes_every_header)
{
    const char *root = cpt_source_root();
    CHECK(root != NULL);
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/include/cport.h", root);
    int n = read_lines(path);
    snprintf(path, sizeof path, "%s/include/cport", root);
    DIR *d = opendir(path);
    CHECK(d != NULL);
    int absent = 0;
    for (struct dirent *e; (e = readdir(d)) != NULL;) {
        size_t len = strlen(e->d_name);
        if (len < 3 || strcmp(e->d_name + len - 2, ".h") != 0)
            continue;
        char want[300];
        snprintf(want, sizeof want, "#include \"cport/%s\"", e->d_name);
        bool found = false;
        for (int i = 0; i < n && !found; i++)
            found = strcmp(lines[i], want) == 0;
        if (!found) {
            fprintf(stderr, "cport.h lacks %s\n", want);
            absent++;
        }
    }
    closedir(d);
    CHECK_EQ(absent, 0);
}
