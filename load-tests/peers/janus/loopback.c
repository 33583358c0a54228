/* Preloaded into Janus by `studyhall-load sfu --peers janus`: getifaddrs() without the
 * IFF_LOOPBACK flag, so that Janus 1.1 (which skips loopback interfaces when it gathers ICE
 * candidates) offers a host candidate on lo, with ice_enforce_list = "lo" the only one. The
 * benchmark only talks to loopback addresses. Nothing else in Janus changes. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <stddef.h>

int getifaddrs(struct ifaddrs **ifap) {
    static int (*real)(struct ifaddrs **) = NULL;
    if (real == NULL)
        real = (int (*)(struct ifaddrs **))dlsym(RTLD_NEXT, "getifaddrs");
    if (real == NULL)
        return -1;
    int r = real(ifap);
    if (r == 0)
        for (struct ifaddrs *i = *ifap; i != NULL; i = i->ifa_next)
            i->ifa_flags &= ~IFF_LOOPBACK;
    return r;
}
