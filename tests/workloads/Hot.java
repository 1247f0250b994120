// A Java hot loop for the JIT-naming test: `spin` is compiled early and then runs for the
// given number of seconds. Started without any flag, as a service in an incident would be.
public class Hot {
    static long spin(long n) {
        long acc = 0;
        for (long i = 0; i < n; i++) { acc = acc * 31 + (i ^ (acc >>> 7)); }
        return acc;
    }
    public static void main(String[] a) {
        long sum = 0;
        long end = System.nanoTime() + Long.parseLong(a[0]) * 1_000_000_000L;
        while (System.nanoTime() < end) { sum += spin(10_000_000); }
        System.out.println(sum);
    }
}
